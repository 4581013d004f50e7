// The demo page: no framework, no build step. Talks to the console's /api only.
"use strict";

const $ = (id) => document.getElementById(id);
let last = null;

function show(id, value) {
  const el = $(id);
  el.textContent = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  // Tokens stand out: the reader sees at a glance which values are ciphertext.
  el.innerHTML = el.innerHTML.replace(/sc1\.[A-Za-z0-9_\-.]+/g, (t) => `<span class="token">${t}</span>`);
}

function record() {
  const f = new FormData($("record"));
  return {
    name: f.get("name"),
    ssn: f.get("ssn"),
    card: { number: f.get("card"), expiry: "12/29" },
    contacts: [{ kind: "home", phone: f.get("phone") }],
  };
}

function renderTls(tls) {
  const dl = $("tls");
  dl.replaceChildren();
  const rows = [["TLS", tls.version], ["cipher", tls.cipher]];
  if (tls.certificate) {
    rows.push(["certificate", tls.certificate.subject], ["issuer", tls.certificate.issuer],
      ["names", tls.certificate.names.join(", ")], ["valid until", tls.certificate.not_after],
      ["SHA-256", tls.certificate.sha256]);
  }
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v ?? "";
    dl.append(dt, dd);
  }
}

function renderViews(views) {
  const box = $("views");
  box.replaceChildren();
  for (const v of views) {
    const div = document.createElement("div");
    div.className = "view";
    div.dataset.role = v.role;
    const h = document.createElement("h3");
    h.textContent = `${v.cn} (${v.role}): ${v.grants}`;
    const st = document.createElement("span");
    st.className = v.status === 200 ? "status-ok" : "status-denied";
    st.textContent = ` HTTP ${v.status}`;
    h.append(st);
    const pre = document.createElement("pre");
    pre.id = `view-${v.role}`;
    div.append(h, pre);
    box.append(div);
    show(pre.id, v.body);
  }
}

function renderWire() {
  if (!last) return;
  const plain = $("no-tls").checked;
  const w = last.wire;
  if (plain) {
    $("wire-hint").textContent = `The same request over plain HTTP (captured on its way to a sink, not the app): ${w.plain.bytes} bytes anyone on the path can read.`;
    show("wire", w.plain.text);
  } else {
    $("wire-hint").textContent = `Captured bytes of the client's TLS connection to sidecrypt (${w.tls.bytes} bytes; the first 768 shown): records, no readable field.`;
    show("wire", w.tls.hex.match(/.{1,64}/g).join("\n"));
  }
}

async function refreshAudit() {
  try {
    const r = await fetch("/api/audit");
    const a = await r.json();
    const body = $("audit");
    body.replaceChildren();
    for (const rec of a.records.slice(-20).reverse()) {
      const tr = document.createElement("tr");
      const e = rec.event || {};
      for (const v of [rec.seq, e.action || rec.kind, e.outcome, e.principal, (e.fields || []).join(" ")]) {
        const td = document.createElement("td"); td.textContent = v ?? ""; tr.append(td);
      }
      body.append(tr);
    }
    const v = $("verify");
    if (a.verify) {
      v.textContent = a.verify.ok ? "chain verified" : "chain BROKEN";
      v.className = a.verify.ok ? "ok" : "bad";
      v.title = a.verify.summary;
    }
  } catch (e) { /* the next poll tries again */ }
}

async function submit(ev) {
  ev.preventDefault();
  $("status").textContent = "sending…";
  const sent = record();
  const r = await fetch("/api/records", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(sent),
  });
  const res = await r.json();
  if (!r.ok || res.error) {
    $("status").textContent = res.error || `failed (${r.status})`;
    return;
  }
  last = res;
  show("sent", res.sent);
  renderTls(res.tls);
  show("stored", res.stored);
  renderViews(res.views);
  renderWire();
  $("status").textContent = `record ${res.id} stored`;
  document.body.dataset.record = res.id;
  refreshAudit();
}

async function init() {
  const info = await (await fetch("/api/info")).json();
  $("fields").textContent = info.fields.join(", ");
  $("record").addEventListener("submit", submit);
  $("no-tls").addEventListener("change", renderWire);
  refreshAudit();
  setInterval(refreshAudit, 2000);
}

init();
