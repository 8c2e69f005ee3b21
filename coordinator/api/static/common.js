// Shared by the operator and provider pages. Everything shown comes from the JSON APIs;
// text from workers (names, GPU models) is only ever set as textContent, never as HTML.
"use strict";

const Agora = {
  credits(micro) {  // exact, like billing.pricing.format_micro (without the currency)
    const n = Number(micro), a = Math.abs(n);
    return (n < 0 ? "-" : "") + Math.floor(a / 1e6) + "." + String(a % 1e6).padStart(6, "0");
  },
  ms(seconds) { return seconds == null ? "—" : (seconds * 1000).toFixed(1) + " ms"; },
  short(id) { return id ? "…" + String(id).slice(-10) : "—"; },
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value; else node.setAttribute(key, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },
  table(headers, rows, empty) {
    if (!rows.length) return Agora.el("p", { class: "empty" }, empty || "nothing yet");
    const head = Agora.el("tr", {}, ...headers.map(([label, cls]) => Agora.el("th", { class: cls || "" }, label)));
    const body = rows.map((cells) => Agora.el("tr", cells.attrs || {}, ...cells.map(([value, cls, id]) => {
      const td = Agora.el("td", { class: cls || "" }, value);
      if (id) td.dataset.testid = id;
      return td;
    })));
    return Agora.el("table", {}, Agora.el("thead", {}, head), Agora.el("tbody", {}, ...body));
  },
  bar(used, total) {
    const share = total ? Math.min(1, used / total) : 0;
    const bar = Agora.el("div", { class: "bar", title: `${used} of ${total} in use` });
    const fill = Agora.el("div", { class: "used" });
    fill.style.width = (share * 100).toFixed(1) + "%";
    bar.append(fill);
    return bar;
  },
  fill(id, node) { const box = document.getElementById(id); box.replaceChildren(node); },
  // One uPlot chart per box, rebuilt when the data change (cheap: an hour of 5 s points).
  chart(id, title, series, xs, ys, range) {
    const box = document.getElementById(id);
    const width = Math.max(300, box.clientWidth || 360);
    const opts = {
      title, width, height: 190, scales: range ? { y: { range } } : {},
      series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, points: { show: false } }))],
      axes: [{}, { size: 56 }],
    };
    if (box._plot) box._plot.destroy();
    box._plot = new uPlot(opts, [xs, ...ys], box);
  },
  async getJson(url) {
    const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401 || response.status === 403) { window.location.reload(); throw new Error("signed out"); }
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  },
  every(ms, work) {
    const tick = async () => {
      try { await work(); document.body.dataset.loaded = "1"; }
      catch (error) { document.getElementById("updated").textContent = "update failed: " + error.message; }
    };
    tick(); return setInterval(tick, ms);
  },
};
