// The operator dashboard: GET /admin/v1/overview every 2 s (the same JSON `agora status` prints).
"use strict";
const { el, credits, ms, short, table, bar, fill, chart } = Agora;

function kpis(o) {
  const m = o.money;
  const cards = [
    ["Workers", o.workers.length, "kpi-workers"],
    ["Free slots", o.capacity.by_model.reduce((a, r) => a + r.free, 0), "kpi-free"],
    ["Requests settled", o.settled_requests, "kpi-requests"],
    ["Revenue", credits(m.revenue), "kpi-revenue"],
    ["Network fees", credits(m.fees), "kpi-fees"],
    ["Provider earnings", credits(m.provider_earnings), "kpi-earnings"],
    ["Owed to providers", credits(m.owed_to_providers), "kpi-owed"],
    ["Paid out", credits(m.paid_out), "kpi-paid"],
  ];
  fill("kpis", el("div", { class: "kpis", style: "display:contents" }, ...cards.map(([label, value, id]) =>
    el("div", { class: "kpi" }, el("div", { class: "label" }, label), el("div", { class: "value", "data-testid": id }, value)))));
}

function capacity(rows, key, id) {
  fill(id, table(
    [[key === "model" ? "Model" : "GPU type"], ["Workers", "num"], ["Total", "num"], ["In use", "num"], ["Free", "num"], ["Use"]],
    rows.map((r) => [[r[key], "", `cap-${key}-${r[key]}-name`], [r.workers, "num"], [r.total, "num", `cap-${key}-${r[key]}-total`],
      [r.in_use, "num", `cap-${key}-${r[key]}-in_use`], [r.free, "num", `cap-${key}-${r[key]}-free`], [bar(r.in_use, r.total)]]),
    "no workers connected"));
}

function workers(list) {
  const rows = [];
  for (const w of list) {
    for (const [model, s] of Object.entries(w.models)) {
      const status = el("span", { class: "pill " + w.status }, w.status);
      const rep = w.reputation;
      const trust = el("span", {}, rep ? rep.score.toFixed(2) + " " : "—");
      if (rep && rep.probation) trust.append(el("span", { class: "pill probation" }, "probation"));
      rows.push([[el("span", { class: "mono", title: w.node_id }, short(w.node_id)), "", `worker-${w.node_id}`], [status],
        [model], [w.gpu], [credits(s.price_completion_per_mtok), "num"], [`${s.in_flight}/${s.max_concurrency}`, "num"],
        [ms(s.ttft_s), "num"], [ms(s.itl_s), "num"], [lora(s), "num"], [trust], [s.missed_for_capacity, "num"],
        [w.last_seen_s + " s", "num"]]);
    }
  }
  fill("workers", table([["Node"], ["Status"], ["Model"], ["GPU"], ["Price /1M out", "num"], ["Load", "num"], ["TTFT", "num"],
    ["ITL", "num"], ["LoRA", "num"], ["Reputation"], ["Missed (full)", "num"], ["Last seen", "num"]], rows,
    "no workers connected"));
}

function lora(s) {  // adapters loaded / slots, the hashes on hover; "—" for a worker that loads none
  if (!s.max_loras) return "—";
  return el("span", { class: "mono", title: s.adapters.map(short).join(" ") }, `${s.adapters.length}/${s.max_loras}`);
}

function releases(models) {  // GET /admin/v1/models: versions, shares, how each is doing
  const rows = [];
  for (const m of models) {
    for (const v of m.versions) {
      const state = el("span", { class: "pill " + (v.state === "active" ? "idle" : "quarantined") }, v.state);
      const w = v.window, s = v.shadow;
      const shadow = s ? `${s.requests} copies, ${s.failed} failed, ${s.agreed}/${s.compared} same text` : "—";
      rows.push([[m.name + (m.sticky ? " (A/B)" : "")], [v.version + (v.stable ? " ★" : ""), "", `release-${m.name}-${v.version}`],
        [v.serves, "mono"], [(v.share * 100).toFixed(0) + " %", "num", `release-share-${m.name}-${v.version}`],
        [state, "", `release-state-${m.name}-${v.version}`],
        [w.requests, "num"], [(w.error_rate * 100).toFixed(1) + " %", "num"],
        [w.ttft_p95_ms == null ? "—" : w.ttft_p95_ms.toFixed(0) + " ms", "num"], [shadow], [v.note || "", "wrap", `release-note-${m.name}-${v.version}`]]);
    }
  }
  fill("releases", table([["Model"], ["Version"], ["Serves"], ["Share", "num"], ["State"], ["Requests", "num"],
    ["Errors", "num"], ["TTFT p95", "num"], ["Shadow"], ["Last change"]], rows, "no models in the catalogue (agora models create)"));
}

function batches(b) {  // GET /admin/v1/batches: every client's batches and what they use now
  const counts = Object.entries(b.by_status).map(([status, n]) => `${status} ${n}`).join(", ") || "none";
  const summary = el("p", { class: "muted" }, "by status: ", el("span", { "data-testid": "batches-by-status" }, counts),
    " · lines running now ", el("span", { "data-testid": "batches-running" }, b.running_lines),
    ` (queued ${b.queued_lines}) on ${b.model_slots} slots of their models, ${(b.headroom_share * 100).toFixed(0)} % kept for online traffic`);
  const rows = b.batches.map((x) => [[x.id, "mono", `batch-${x.id}`], [x.client], [x.model],
    [x.status, "", `batch-${x.id}-status`], [x.request_counts.completed, "num", `batch-${x.id}-done`],
    [x.request_counts.failed, "num"], [x.request_counts.total, "num"],
    [new Date(x.created_at * 1000).toLocaleTimeString()]]);
  fill("batches", el("div", {}, summary, table([["Batch"], ["Client"], ["Model"], ["Status"], ["Done", "num"],
    ["Failed", "num"], ["Total", "num"], ["Created"]], rows, "no batches yet")));
}

function policies(p, h) {  // GET /admin/v1/policies and /hits: who runs what, what it did (counts only)
  const names = p.policies.map((x) => [[x.name, "", `policy-${x.name}`], [x.version == null ? "—" : "v" + x.version],
    [(x.sha256 || "").slice(0, 16), "mono"], [(x.steps || []).map((s) => s.kind).join(", ") || x.error || "", "wrap"],
    [x.attached.join(", ") || "—", "wrap", `policy-${x.name}-attached`], [h.requests[x.name] || 0, "num", `policy-${x.name}-requests`]]);
  const hits = h.hits.map((x) => [[x.policy], [x.step], [x.entity, "", `policy-hit-${x.policy}-${x.entity}-${x.action}`],
    [x.action], [x.count, "num", `policy-hit-${x.policy}-${x.entity}-${x.action}-count`]]);
  fill("policies", el("div", {}, table([["Policy"], ["Version"], ["SHA-256"], ["Steps"], ["Runs for"], ["Requests acted on", "num"]],
    names, "no policies (agora policies set)"), table([["Policy"], ["Step"], ["Entity"], ["Action"], ["Count", "num"]],
    hits, "no policy actions yet")));
}

function demand(m) {  // GET /v1/market: the signed demand board (what providers see)
  const rows = Object.entries(m.body.board.models).map(([model, r]) => {
    const w = r.windows["300s"], c = r.capacity;
    return [[r.wanted ? `${model} (wanted)` : model, "", `demand-${model}`], [w.requests, "num", `demand-${model}-served`],
      [`${w.unmet.capacity} / ${w.unmet.price}`, "num", `demand-${model}-unmet`], [r.queue_depth, "num"],
      [w.mean_wait_ms == null ? "—" : w.mean_wait_ms + " ms", "num"],
      [w.clearing_price.completion.p50 == null ? "—" : w.clearing_price.completion.p50.toLocaleString(), "num"],
      [c.workers, "num"], [c.slots ? `${c.in_use} / ${c.slots}` : "—", "num"]];
  });
  fill("demand", el("div", {}, table([["Model"], ["Served", "num"], ["Unmet (capacity / price)", "num"], ["Queued now", "num"],
    ["Mean wait", "num"], ["Price p50 (per 1M out)", "num"], ["Workers", "num"], ["Slots in use", "num"]], rows,
    "no demand yet"), el("p", { class: "muted" }, `${m.peers.length} peer board(s) on gossip · GET /v1/market · agora market`)));
}

function network(n) {  // GET /admin/v1/network: the other coordinators this one hears on gossip
  if (!n.enabled) {
    fill("network", el("p", { class: "empty", "data-testid": "network-off" },
      "This coordinator stands alone (p2p off): start it with --p2p-listen and --bootstrap to join a market."));
    return;
  }
  const refused = Object.entries(n.rejected).map(([why, count]) => `${why} ${count}`).join(", ") || "none";
  const summary = el("p", { class: "muted" }, "peer ", el("span", { class: "mono", title: n.peer_id }, short(n.peer_id)),
    " · connected peers ", el("span", { "data-testid": "network-peers" }, n.connected_peers.length),
    " · gossip accepted ", el("span", { "data-testid": "network-accepted" }, n.accepted),
    " · refused ", el("span", { "data-testid": "network-refused" }, refused));
  const rows = n.coordinators.map((c) => [
    [el("span", { class: "mono", title: c.coordinator_id }, short(c.coordinator_id)), "", `coord-${c.coordinator_id}`],
    [c.api_url, "mono", `coord-${c.coordinator_id}-api`], [c.models.join(", ") || "—"],
    [c.workers.length, "num", `coord-${c.coordinator_id}-workers`], [c.standing.toFixed(2), "num"],
    [(c.seen_ms_ago / 1000).toFixed(1) + " s", "num"]]);
  const others = table([["Coordinator"], ["Client API"], ["Models"], ["Workers", "num"], ["Standing", "num"], ["Last heard", "num"]],
    rows, "no other coordinator heard yet");
  fill("network", el("div", {}, summary, others));
}

function traffic(points) {
  const xs = points.map((p) => p.t);
  chart("chart-rate", "Requests/s and tokens/s", [["requests/s", "#2e6bd9"], ["tokens/s", "#1f9d55"]], xs,
    [points.map((p) => p.requests_per_s), points.map((p) => p.tokens_per_s)]);
  chart("chart-ttft", "TTFT (s)", [["p50", "#2e6bd9"], ["p99", "#c98a04"]], xs,
    [points.map((p) => p.ttft_p50_s), points.map((p) => p.ttft_p99_s)]);
  chart("chart-errors", "Error rate", [["errors / requests", "#d14343"]], xs, [points.map((p) => p.error_rate)], [0, 1]);
}

function money(o) {
  fill("epochs", table([["Epoch"], ["Opened"], ["State"], ["Paid", "num"]], o.epochs.slice().reverse().map((e) => [
    [e.epoch], [e.opened_at.slice(0, 19).replace("T", " ")], [e.closed_at ? "closed" : "open"], [credits(e.paid), "num"]])));
  fill("clients", table([["Client"], ["Spent", "num"], ["Balance", "num"]], o.top_clients.map((c) => [
    [c.client, "", `client-${c.client}`], [credits(c.spent), "num", `client-${c.client}-spent`],
    [credits(c.balance), "num", `client-${c.client}-balance`]]), "no spend yet"));
  fill("failures", table([["When"], ["Node"], ["What"]], o.verification_failures.map((f) => [
    [new Date(f.at * 1000).toLocaleTimeString()], [el("span", { class: "mono" }, short(f.node_id))],
    [f.outcome + (f.detail ? ": " + f.detail : ""), "wrap"]]), "none — every check passed"));
}

function routing(records) {
  fill("routing", table([["When"], ["Request"], ["Model"], ["Chosen"], ["Why (score terms; lower score wins)"]],
    records.map((r) => {
      const best = r.decision.ranked[0];
      const why = best ? `score ${best.score.toFixed(3)}: ` + Object.entries(best.terms).map(([k, v]) => `${k}=${Number(v).toPrecision(3)}`).join(", ")
        + ` · considered ${r.decision.considered}, sampled ${r.decision.sampled}` : "no worker";
      return [[new Date(r.at * 1000).toLocaleTimeString()], [r.request_id, "mono"], [r.model],
        [el("span", { class: "mono" }, best ? short(best.node_id) : "—")], [why, "wrap"]];
    }), "no requests yet"));
}

Agora.every(2000, async () => {
  const [o, n, r, b, p, h, m] = await Promise.all([Agora.getJson("/admin/v1/overview"), Agora.getJson("/admin/v1/network"),
    Agora.getJson("/admin/v1/models"), Agora.getJson("/admin/v1/batches"), Agora.getJson("/admin/v1/policies"),
    Agora.getJson("/admin/v1/policies/hits"), Agora.getJson("/v1/market").catch(() => null)]);
  kpis(o); capacity(o.capacity.by_model, "model", "capacity-model"); capacity(o.capacity.by_gpu, "gpu", "capacity-gpu");
  workers(o.workers); releases(r.models); batches(b); policies(p, h); network(n); traffic(o.traffic); money(o); routing(o.routing);
  if (m) demand(m); else fill("demand", el("p", { class: "empty" }, "the demand board did not answer"));
  document.getElementById("updated").textContent = "updated " + new Date(o.at * 1000).toLocaleTimeString();
});
