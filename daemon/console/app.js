// secondlook's web console: plain JS over the daemon's JSON API (see daemon/console_api.py).
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
};
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const num = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// API with the bearer token, when the daemon wants one ------------------------------------
let token = localStorage.getItem("secondlook-token") || "";
let refused = false; // the token was refused: no polling until another is entered

// a bearer token is printable ASCII (a header cannot carry anything else)
const TOKEN_CHARS = /^[\x21-\x7e]+$/;

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token && !TOKEN_CHARS.test(token)) {
    $("#login").hidden = false;
    throw new Error("the token may hold printable ASCII characters only");
  }
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (error) {
    throw new Error("the daemon cannot be reached (stopped, or the network is down)");
  }
  if (response.status === 401) {
    refused = true;
    $("#login").hidden = false;
    $("#token").focus();
    throw new Error(token ? "the token was refused: enter a valid one" : "a token is needed");
  }
  return response;
}

// a bucket's width as people say it: "2.5 min", "1 h"
function bucketText(seconds) {
  const [size, unit] = seconds >= 3600 ? [seconds / 3600, "h"] : [seconds / 60, "min"];
  return `${Number(size.toFixed(1))} ${unit}`;
}

// an answer's JSON body; a proxy's error page or a cut answer says what came instead
async function bodyOf(response) {
  try {
    return await response.json();
  } catch (error) {
    throw new Error(`the server answered ${response.status} ${response.statusText} without the expected data`);
  }
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await bodyOf(response);
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("#token").value.trim();
  if (!TOKEN_CHARS.test(token)) {
    $("#status").textContent = token
      ? "the token may hold printable ASCII characters only"
      : "enter one of the daemon's tokens";
    return;
  }
  localStorage.setItem("secondlook-token", token);
  refused = false;
  $("#login").hidden = true;
  refresh();
});

// images come through fetch (so the token goes along) as blob URLs, each once per alert --
const images = new Map(); // ref -> Promise of a blob URL ("" when there is none)
function thumbnail(ref) {
  const img = el("img", { alt: "snapshot", "data-testid": "thumb" });
  if (!images.has(ref)) {
    // a passing failure (a refused token, a busy daemon, the network) is tried again at the
    // next drawing; a snapshot pruned (404) or undecodable (422) stays blank
    const again = () => { images.delete(ref); return ""; };
    images.set(ref, api(`/v1/snapshots/${ref}/0?thumb=1`)
      .then((r) => {
        if (r.ok) return r.blob().then((blob) => URL.createObjectURL(blob));
        return r.status === 404 || r.status === 422 ? "" : again();
      })
      .catch(again));
  }
  images.get(ref).then((url) => { if (url) img.src = url; });
  return img;
}
function forgetThumbnail(ref) {
  const url = images.get(ref);
  images.delete(ref);
  if (url) url.then((u) => { if (u) URL.revokeObjectURL(u); });
}

// pages ------------------------------------------------------------------------------------
let page = "alerts";
for (const tab of document.querySelectorAll("nav button")) {
  tab.addEventListener("click", () => {
    page = tab.dataset.page;
    for (const other of document.querySelectorAll("nav button")) {
      other.classList.toggle("active", other === tab);
      other.setAttribute("aria-selected", String(other === tab));
    }
    for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== page;
    refresh();
  });
}

async function refresh() {
  try {
    if (page === "alerts") await showAlerts();
    if (page === "rules") await showRules();
    if (page === "stats") await showStats();
    if (page === "playground") await fillSnapshots();
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("#status").textContent = error.message;
  }
}
setInterval(() => { if (page === "alerts" && !refused) refresh(); }, 2000);
setInterval(() => { if ((page === "rules" || page === "stats") && !refused) refresh(); }, 10000);
let before = null; // the ref the page shown starts below (null: the newest alerts)
for (const id of ["#f-camera", "#f-rule", "#f-verdict"]) $(id).addEventListener("change", () => { before = null; refresh(); });
$("#older").addEventListener("click", () => {
  const last = $("#alert-list").lastElementChild;
  for (const [ref, card] of cards) if (card.node === last) before = ref;
  refresh();
});
$("#newer").addEventListener("click", () => { before = null; refresh(); });

// alerts -----------------------------------------------------------------------------------
const PAGE = 50; // alerts per page
const cards = new Map(); // ref -> {identity, signature, node}
let asked = 0; // the newest request for the list: older answers are dropped

async function showAlerts() {
  // one more than shown: whether there are older ones
  const query = new URLSearchParams({ limit: String(PAGE + 1) });
  if ($("#f-camera").value) query.set("camera_id", $("#f-camera").value);
  if ($("#f-rule").value) query.set("rule", $("#f-rule").value);
  if ($("#f-verdict").value) query.set("verdict", $("#f-verdict").value);
  if (before !== null) query.set("before", String(before));
  const mine = ++asked;
  const answer = (await json(`/v1/alerts?${query}`)).alerts;
  if (mine !== asked) return; // the filters changed meanwhile
  const alerts = answer.slice(0, PAGE);
  const list = $("#alert-list");
  // the cards shown are those of this answer only (a journal started afresh reuses refs)
  const shown = new Map(alerts.map((alert) => [alert.ref, `${alert.box_id}\n${alert.alert_id}`]));
  for (const [ref, card] of cards) {
    if (shown.get(ref) !== card.identity) {
      card.node.remove();
      cards.delete(ref);
      forgetThumbnail(ref);
    }
  }
  $("#alerts-empty").hidden = alerts.length > 0;
  $("#alerts-empty").textContent = before === null
    ? "No alerts match these filters (camera and rule are exact names)."
    : "No older alerts.";
  $("#older").hidden = answer.length <= PAGE;
  $("#newer").hidden = before === null;
  let previous = null;
  for (const alert of alerts) {
    const signature = JSON.stringify([alert.state, alert.verdicts]);
    let card = cards.get(alert.ref);
    if (!card || card.signature !== signature) {
      const node = alertCard(alert);
      if (card) {
        const keep = stateOf(card.node);
        card.node.replaceWith(node);
        keep(node);
      }
      card = { identity: shown.get(alert.ref), signature, node };
      cards.set(alert.ref, card);
    }
    if (previous === null ? list.firstChild !== card.node : previous.nextSibling !== card.node) {
      if (previous === null) list.prepend(card.node); else previous.after(card.node);
    }
    previous = card.node;
  }
}

// what the operator was doing in a card that is drawn again (new feedback, a verdict
// published): its open details, what they typed, and the control they were on
function stateOf(old) {
  const opened = [...old.querySelectorAll("details")].map((d) => d.open);
  const typed = [...old.querySelectorAll("textarea, input")].map((i) => i.value);
  const focused = old.contains(document.activeElement) ? document.activeElement : null;
  const testid = focused?.dataset.testid;
  const nth = testid ? [...old.querySelectorAll(`[data-testid="${testid}"]`)].indexOf(focused) : -1;
  return (node) => {
    node.querySelectorAll("details").forEach((d, i) => { if (opened[i]) d.open = true; });
    node.querySelectorAll("textarea, input").forEach((input, i) => {
      if (typed[i] !== undefined) input.value = typed[i];
    });
    if (testid) node.querySelectorAll(`[data-testid="${testid}"]`)[nth]?.focus();
  };
}

function alertCard(alert) {
  const verdicts = alert.verdicts.length
    ? alert.verdicts.map((v) => verdictRow(alert, v))
    : [el("div", { class: "verdict" }, el("span", { class: "badge unreviewed" }, alert.state))];
  return el("div", { class: "alert", "data-testid": "alert", "data-alert-id": alert.alert_id },
    alert.images ? thumbnail(alert.ref) : el("div"),
    el("div", {},
      // <bdi>: an id holding right-to-left text or a bidi override stays within itself
      el("h4", {}, el("bdi", {}, alert.event_type), " · ", el("bdi", {}, alert.camera_id), " · ", el("bdi", {}, alert.box_id)),
      el("div", {}, el("bdi", {}, alert.alert_id), ` · occurred ${alert.occurred_at} · box score ${alert.score ?? "–"}`,
        alert.images ? el("button", { "data-testid": "alert-try", onclick: () => tryAlert(alert),
          "aria-label": `try a prompt on the snapshot of alert ${alert.alert_id}` }, "try in playground") : null),
      verdicts));
}

function verdictRow(alert, v) {
  const sides = v.verdict === "confirmed" || v.verdict === "rejected"
    ? [["right", { correct: true }], ["wrong", { correct: false }]]
    : [["real", { label: "real" }], ["false alarm", { label: "false" }]];
  const fb = v.feedback;
  const given = fb
    ? el("span", { "data-testid": "feedback-given" }, "feedback: " + [
      fb.label ?? "",
      fb.correct === null ? "" : fb.correct ? "(right)" : "(wrong)",
      fb.fields ? JSON.stringify(fb.fields) : "",
      fb.note ? `“${fb.note}”` : "",
    ].filter(Boolean).join(" "))
    : null;
  const problem = el("span", { class: "error", "data-testid": "feedback-error" });
  const buttons = v.rule
    ? el("span", { class: "feedback" }, sides.map(([label, said]) => el("button", {
      "data-testid": `feedback-${label.split(" ")[0]}`,
      onclick: () => sendFeedback(alert, v.rule, said, problem),
    }, label)))
    : null;
  return el("div", {},
    el("div", { class: "verdict" },
      el("span", { class: `badge ${v.verdict}`, "data-testid": "verdict" }, v.verdict),
      el("span", {}, `rule ${v.rule ?? "–"}`),
      el("span", { "data-testid": "confidence" }, `P(real) ${num(v.confidence)}`),
      el("span", {}, `${v.latency_ms} ms`),
      buttons, given, problem),
    el("details", {}, el("summary", {}, v.reason),
      v.prompt ? el("pre", {}, `prompt: ${v.prompt}`) : null,
      v.raw ? el("pre", {}, `model: ${v.raw}`) : null,
      Object.keys(v.fields || {}).length ? el("pre", {}, JSON.stringify(v.fields)) : null,
      correctionForm(alert, v, problem)));
}

// the right fields of a classify or extract verdict (what a model should have answered; an
// answer that did not parse too), with a note: feedback that export-dataset turns into
// training samples (an unreviewed verdict has no answer to correct)
function correctionForm(alert, v, problem) {
  if (!v.rule || v.verdict === "unreviewed" || !["classify", "extract"].includes(v.kind)) return null;
  const classified = v.kind === "classify";
  const area = el("textarea", { rows: 2, cols: 40, "data-testid": "correct-fields",
    "aria-label": "the right fields, as JSON" });
  // a correction given already, else the model's answer, with the rule's fields it left out
  const given = v.feedback?.fields;
  const declared = Object.keys(v.answers?.fields || {});
  const fields = given || Object.assign(Object.fromEntries(declared.map((n) => [n, null])), v.fields || {});
  area.value = JSON.stringify(classified ? { label: fields.label ?? "" } : fields);
  const labels = v.answers?.labels;
  const hint = labels ? el("div", { "data-testid": "correct-hint" }, `labels: ${labels.join(", ")}`)
    : declared.length ? el("div", { "data-testid": "correct-hint" },
      `fields: ${declared.map((n) => `${n} (${v.answers.fields[n]})`).join(", ")}`) : null;
  const note = el("input", { "data-testid": "correct-note", placeholder: "note (optional)",
    "aria-label": "note" });
  const send = (event) => {
    event.preventDefault();
    let fields;
    try {
      fields = JSON.parse(area.value);
    } catch (error) {
      problem.textContent = `the fields are not JSON: ${error.message}`;
      return;
    }
    const said = note.value ? { fields, note: note.value } : { fields };
    sendFeedback(alert, v.rule, said, problem);
  };
  return el("form", { class: "correction", onsubmit: send },
    el("label", {}, classified ? "right label " : "right fields ", area), " ", note, " ",
    el("button", { type: "submit", "data-testid": "correct-submit" }, "send correction"), hint);
}

async function sendFeedback(alert, rule, said, problem) {
  // the ids go in the body: a browser rewrites a path holding an alert_id such as ".."
  try {
    await json("/v1/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Feedback-Source": "console" },
      body: JSON.stringify(Object.assign({ alert_id: alert.alert_id, box_id: alert.box_id, rule }, said)),
    });
  } catch (error) {
    problem.textContent = `feedback not stored: ${error.message}`;
    return;
  }
  refresh();
}

// rules ------------------------------------------------------------------------------------
async function showRules() {
  const book = await json("/v1/rules");
  $("#rules-meta").textContent = `${book.directory} · last read ${book.loaded_at}`;
  $("#rules-body").replaceChildren(...book.rules.map((r) => el("tr", { "data-testid": "rule" },
    el("td", { title: r.description }, r.name), el("td", {}, r.state), el("td", {}, r.kind),
    el("td", {}, r.event_types.join(", ")), el("td", {}, r.since),
    el("td", {}, r.counts.alerts ?? 0), el("td", {}, r.counts.confirmed ?? 0),
    el("td", {}, r.counts.rejected ?? 0), el("td", {}, r.counts.uncertain ?? 0),
    el("td", {}, el("button", { "data-testid": "rule-edit", onclick: () => editRule(r) }, "edit")))));
  $("#rule-errors").replaceChildren(...book.errors.map((e) =>
    el("li", { class: "error" }, `${e.file}: ${e.where ? `${e.where}: ` : ""}${e.reason}`)));
}

// a rule's file into the playground: tried there, then saved over itself
function editRule(rule) {
  $("#try-kind").value = "rule";
  showEventTypes();
  $("#try-result").replaceChildren();  // another rule's result would pass for this one's
  $("#try-prompt").value = rule.text;
  $("#save-name").value = rule.file.replace(/\.toml$/, "");
  $("#save-form").hidden = false;
  $("#save-result").textContent = `editing ${rule.file}: Run to try it, Save to replace it`;
  $("[data-testid=tab-playground]").click();
}

// stats ------------------------------------------------------------------------------------
$("#period").addEventListener("change", refresh);

async function showStats() {
  const stats = await json(`/v1/stats?hours=${$("#period").value}`);
  const rows = Object.entries(stats.rules).map(([name, s]) => el("tr", { "data-testid": "stats-row", "data-rule": name },
    el("td", {}, name), el("td", {}, s.alerts), el("td", {}, s.confirmed), el("td", {}, s.rejected),
    el("td", {}, s.uncertain), el("td", {}, s.unreviewed), el("td", {}, pct(s.filtered_ratio)),
    el("td", {}, s.latency_p50_ms ?? "–"), el("td", {}, s.latency_p95_ms ?? "–"),
    el("td", { "data-testid": "feedback-count" }, s.feedback.count),
    el("td", { "data-testid": "precision" }, pct(s.feedback.precision))));
  $("#stats-body").replaceChildren(...rows);
  const timeline = stats.timeline;
  $("#charts").replaceChildren(...Object.entries(timeline.rules).map(([name, series]) => chart(name, series, timeline)));
}

const COLOURS = { confirmed: "#c0392b", rejected: "#27ae60", uncertain: "#e67e22", unreviewed: "#7f8c8d" };

function chart(name, series, timeline) {
  // stacked bars of verdicts per time bucket, drawn as SVG (a bucket of 150 s reads "2.5 min")
  const width = 480, height = 120, n = timeline.buckets, bar = width / n;
  const totals = Array.from({ length: n }, (_, i) => Object.values(series).reduce((a, s) => a + s[i], 0));
  const top = Math.max(1, ...totals);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  for (let i = 0; i < n; i++) {
    let y = height;
    for (const [kind, counts] of Object.entries(series)) {
      const h = (counts[i] / top) * (height - 10);
      if (!h) continue;
      y -= h;
      const rect = document.createElementNS(ns, "rect");
      Object.entries({ x: i * bar + 1, y, width: bar - 2, height: h, fill: COLOURS[kind] })
        .forEach(([k, v]) => rect.setAttribute(k, v));
      const title = document.createElementNS(ns, "title");
      title.textContent = `${kind}: ${counts[i]}`;
      rect.append(title);
      svg.append(rect);
    }
  }
  const start = new Date(timeline.start).toLocaleString();
  return el("div", { class: "chart", "data-testid": "chart" },
    el("div", {}, `${name}: verdicts per ${bucketText(timeline.bucket_s)} since ${start} (max ${top})`), svg);
}

// playground -------------------------------------------------------------------------------
const snapshotOption = (a) => el("option", { value: a.ref }, `${a.alert_id} (${a.event_type}, ${a.camera_id})`);
// the newest snapshots, and the one chosen (from an alert's card: it may be older)
async function fillSnapshots() {
  const { alerts } = await json("/v1/alerts?limit=20");
  const select = $("#try-snapshot");
  const chosen = select.selectedOptions[0];
  const listed = alerts.filter((a) => a.images);
  const kept = chosen?.value && !listed.some((a) => String(a.ref) === chosen.value) ? [chosen] : [];
  const value = select.value;
  select.replaceChildren(el("option", { value: "" }, "—"), ...kept, ...listed.map(snapshotOption));
  select.value = value;
}
// an alert's snapshot into the playground (instead of an upload)
function tryAlert(alert) {
  const select = $("#try-snapshot");
  if (![...select.options].some((o) => o.value === String(alert.ref))) select.append(snapshotOption(alert));
  select.value = String(alert.ref);
  $("#try-file").value = "";
  $("#try-result").replaceChildren();
  $("[data-testid=tab-playground]").click();
}
// one image at a time: choosing one clears the other
$("#try-file").addEventListener("change", () => { if ($("#try-file").files.length) $("#try-snapshot").value = ""; });
$("#try-snapshot").addEventListener("change", () => { if ($("#try-snapshot").value) $("#try-file").value = ""; });

const readBase64 = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

$("#try-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const run = $("[data-testid=try-run]");
  if (run.disabled) return;
  run.disabled = true;
  try { await tryOnce(); } finally { run.disabled = false; }
});
// a rule file names its own event types: the field is for a prompt saved as a rule
function showEventTypes() { $("#save-events").hidden = $("#try-kind").value === "rule"; }
$("#try-kind").addEventListener("change", showEventTypes);

async function tryOnce() {
  const out = $("#try-result");
  out.replaceChildren(el("p", {}, "running …"));
  $("#save-result").textContent = "";
  const body = {};
  const file = $("#try-file").files[0];
  if (file) body.image = await readBase64(file);
  else if ($("#try-snapshot").value) body.snapshot = { ref: Number($("#try-snapshot").value), idx: 0 };
  const text = $("#try-prompt").value;
  if ($("#try-kind").value === "rule") body.rule_toml = text; else { body.prompt = text; body.kind = "verdict"; }
  try {
    const result = await json("/v1/try", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

    out.replaceChildren(el("div", {},
      el("div", { class: "verdict" },
        el("span", { class: `badge ${result.verdict}`, "data-testid": "try-verdict" }, result.verdict),
        el("span", { "data-testid": "try-confidence" }, `P(real) ${num(result.confidence)}`),
        el("span", { "data-testid": "try-latency" }, `${result.latency_ms} ms`),
        el("span", {}, result.model)),
      el("p", {}, result.reason),
      Object.keys(result.fields).length ? el("pre", { "data-testid": "try-fields" }, JSON.stringify(result.fields, null, 1)) : null,
      el("pre", { "data-testid": "try-raw" }, `model output: ${result.raw}`),
      el("pre", {}, `prompt: ${result.prompt}`)));
    $("#save-form").hidden = false;
  } catch (error) {
    out.replaceChildren(el("p", { class: "error", "data-testid": "try-error" }, error.message));
  }
}

$("#save-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("#save-name").value.trim();
  const events = $("#save-events").value.split(",").map((s) => s.trim()).filter(Boolean);
  let options;
  if ($("#try-kind").value === "rule") {
    options = { method: "PUT", headers: { "Content-Type": "text/plain" }, body: $("#try-prompt").value };
  } else if (!events.length) {
    // a rule without event types would review every alert: "*" says so on purpose
    $("#save-result").textContent = "name the event types to review (* for all of them)";
    return;
  } else {
    options = { method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: $("#try-prompt").value, kind: "verdict", event_types: events }) };
  }
  const path = `/v1/rules/${encodeURIComponent(name)}`;
  try {
    let response = await api(path, options);
    let saved = await bodyOf(response);
    // a rule file of that name exists: replaced only when the operator says so
    if (response.status === 409 && saved.field === "name") {
      if (!window.confirm(`A rule file ${name}.toml exists. Replace it?`)) {
        $("#save-result").textContent = `not saved: ${name}.toml exists and was kept`;
        return;
      }
      response = await api(`${path}?overwrite=1`, options);
      saved = await bodyOf(response);
    }
    if (!response.ok) throw new Error(saved.error || response.statusText);
    $("#save-result").textContent = `saved as ${saved.file}`;
  } catch (error) {
    // the file named in a refusal is the one it would have written: nothing was written
    $("#save-result").textContent = `not saved: ${error.message}`;
  }
});

refresh();
