// The provider view: GET /provider/v1/me every 2 s (only the signed-in node's own data).
"use strict";
const { el, credits, table, fill, chart } = Agora;

Agora.every(2000, async () => {
  const me = await Agora.getJson("/provider/v1/me");
  document.getElementById("node").textContent = me.node_id;
  const earnedOpen = Object.values(me.open_epoch).reduce((a, m) => a + m.earned, 0);
  const paid = me.epochs.reduce((a, e) => a + e.amount, 0);
  const rep = me.reputation;
  const missed = Object.values(me.jobs_missed_for_capacity).reduce((a, n) => a + n, 0);
  const cards = [
    ["Status", me.worker ? me.worker.status : "not connected", "me-status"],
    ["Jobs served", me.jobs_served, "me-jobs"],
    ["Earned this epoch", credits(earnedOpen), "me-earned-open"],
    ["Paid out", credits(paid), "me-paid"],
    ["Reputation", rep ? rep.score.toFixed(2) + (rep.probation ? " (probation)" : "") : "—", "me-reputation"],
    ["Missed (full)", missed, "me-missed"],
  ];
  fill("kpis", el("div", { style: "display:contents" }, ...cards.map(([label, value, id]) =>
    el("div", { class: "kpi" }, el("div", { class: "label" }, label), el("div", { class: "value", "data-testid": id }, value)))));
  fill("open-epoch", table([["Model"], ["Jobs", "num"], ["Earned", "num"]], Object.entries(me.open_epoch).map(([model, m]) => [
    [model], [m.jobs, "num", `open-${model}-jobs`], [credits(m.earned), "num", `open-${model}-earned`]]), "no jobs this epoch yet"));
  fill("epochs", table([["Epoch"], ["Receipts", "num"], ["Paid", "num"], ["By model"]], me.epochs.slice().reverse().map((e) => [
    [e.epoch], [e.receipts, "num"], [credits(e.amount), "num"],
    [Object.entries(e.by_model).map(([m, v]) => `${m}: ${credits(v)}`).join(", "), "wrap"]]), "no closed epoch yet"));
  fill("missed", table([["Model"], ["Missed", "num"]], Object.entries(me.jobs_missed_for_capacity).map(([m, n]) => [[m], [n, "num"]]),
    "none: you had room whenever you were asked"));
  const history = me.reputation_history;
  chart("chart-reputation", "Reputation score", [["score", "#5b21b6"]], history.map((p) => p.at), [history.map((p) => p.score)], [0, 1]);
  const advert = me.advert;
  fill("advert", advert ? el("div", {},
    table([["Model"], ["Price /1M in", "num"], ["Price /1M out", "num"], ["Slots", "num"], ["Context", "num"],
      ["Pricing (auto: the last decision, and why)", "wrap"]],
      advert.models.map((m) => [[m.name, "", `advert-${m.name}`], [credits(m.price_prompt_per_mtok), "num"],
        [credits(m.price_completion_per_mtok), "num"], [m.max_concurrency, "num"], [m.context_length, "num"],
        [((me.worker || {}).models || {})[m.name]?.ask_note || "fixed", "wrap", `ask-note-${m.name}`]])),
    el("p", { class: "muted" }, Object.entries(advert.hardware).map(([k, v]) => `${k}: ${v}`).join(" · ")),
    ...Object.entries(me.worker ? me.worker.models : {}).filter(([, m]) => m.reaped_orphan_pid).map(([name, m]) =>
      el("p", { class: "warning", "data-testid": `reaped-${name}` },
        `${name}: killed engine pid ${m.reaped_orphan_pid} at start, left running by a node that died`)))
    : el("p", { class: "empty" }, "your node is not connected"));
  document.getElementById("updated").textContent = "updated " + new Date(me.at * 1000).toLocaleTimeString();
});
