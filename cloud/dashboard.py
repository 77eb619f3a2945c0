"""``GET /ui``: the operator's dashboard, one self-contained page over the admin API.

The page holds no data and no secret, so it is public; every figure on it comes from
``/admin/...`` (docs/ADMIN.md) with the admin token the operator types in, kept in
``sessionStorage`` (gone with the tab). What a webhook sender or a connector controls (message
ids, nack reasons, connector names) reaches the page, so the script builds the DOM with
``textContent`` only, and the Content-Security-Policy allows no script but the page's own
(pinned by its hash): an injected ``<script>`` or ``onerror=`` would not run even if it got in.
"""

from __future__ import annotations

import base64
import hashlib

from starlette.requests import Request
from starlette.responses import HTMLResponse

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem}
h1{font-size:1.3rem}h2{font-size:1.1rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;width:100%;margin:.3rem 0}
th,td{text-align:left;padding:.2rem .5rem;border-bottom:1px solid #e3e3e3}
th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.pick{cursor:pointer}tr.pick:hover,tr.on{background:#eef4ff}
section{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;margin:1rem 0}
.err{color:#a00}.ok{color:#064}.muted{color:#777}
code.secret{background:#fffbe0;border:1px solid #e6d98c;padding:.2rem .4rem;user-select:all}
form{display:inline-flex;gap:.4rem;align-items:center;margin:.3rem 1rem .3rem 0}
dl{display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem}dd{margin:0}
#feed{max-height:16rem;overflow-y:auto}
"""

SCRIPT = """
"use strict";
const TOKEN_KEY = "webhook-connect-admin-token";
const REFRESH_MS = 2000;
const LIMITS = ["ttl_seconds", "max_queue_size", "max_connections", "max_in_flight",
  "ack_timeout_seconds", "max_delivery_attempts", "retry_delay_seconds"];
const $ = (id) => document.getElementById(id);
let selected = null;
let active = false;  // logged in: the refresh loop runs
let timer = null;
let refreshing = false;
let again = false;
const shown = {};

class ApiError extends Error {
  constructor(status, code, detail) {
    const text = typeof detail === "string" ? detail : JSON.stringify(detail);
    super(code + (detail ? ": " + text : ""));
    this.status = status; this.code = code;
  }
}

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) e.setAttribute(name, value);
  return e;
}
function withButton(tr, text, testid, onclick) {
  const b = el("button", text, {type: "button", "data-testid": testid});
  b.addEventListener("click", (event) => { event.stopPropagation(); onclick(); });
  tr.append(el("td"));
  tr.lastChild.append(b);
  return tr;
}
function when(t) {
  return t === null || t === undefined ? "never" : new Date(t * 1000).toLocaleString();
}
function path(...parts) { return parts.map(encodeURIComponent).join("/"); }
function show(view) {
  for (const id of ["login", "off", "app"]) $(id).hidden = id !== view;
}

async function api(method, route, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const init = {method, headers: {}, cache: "no-store"};
  if (token) init.headers.Authorization = "Bearer " + token;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body);
  }
  // Relative, so the dashboard works behind a proxy that mounts the cloud under a prefix.
  const answer = await fetch("admin/" + route, init);
  const data = await answer.json().catch(() => null);
  if (answer.ok) return data;
  const error = new ApiError(answer.status, (data && data.error) || "http_" + answer.status,
                             data && data.detail);
  if (answer.status === 401) logout(token ? "The admin token was refused." : "");
  else if (error.code === "admin_disabled") { active = false; show("off"); }
  throw error;
}

function logout(message) {
  active = false; clearTimeout(timer); sessionStorage.removeItem(TOKEN_KEY); select(null);
  $("created").hidden = true; $("created-value").textContent = ""; status("", true);
  $("login-error").textContent = message || ""; show("login");
}
function status(message, ok) {
  $("status").textContent = message; $("status").className = ok ? "ok" : "err";
}

// Rebuild a table body only when its data changed: a click or a selection survives a refresh.
function fill(id, rows, build) {
  const key = JSON.stringify(rows);
  if (shown[id] === key) return;
  shown[id] = key;
  const body = $(id);
  body.replaceChildren(...rows.map(build));
  $(id + "-empty").hidden = rows.length > 0;
}
function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const [text, field, numeric] of cells) {
    const td = el("td", text, {"data-field": field});
    if (numeric) td.className = "n";
    tr.append(td);
  }
  return tr;
}

// One refresh at a time; asked for during one, it runs again right after it.
async function refresh() {
  if (refreshing) { again = true; return; }
  refreshing = true; again = false; clearTimeout(timer);
  try {
    if (!document.hidden) {
      const listed = await api("GET", "channels");
      renderChannels(listed.channels);
      if (selected !== null) await refreshChannel(selected);
      $("refresh-error").textContent = "";
    }
  } catch (error) {
    if (error.code === "unknown_channel") select(null);
    else if (active) $("refresh-error").textContent = "Refresh failed: " + error.message;
  } finally {
    refreshing = false;
    if (active) timer = setTimeout(refresh, again ? 0 : REFRESH_MS);
  }
}

function renderChannels(channels) {
  fill("channels-body", channels.map((c) => [c.name, c.depth, c.in_flight, c.dead_letters,
                                              c.connections]), ([name, ...figures]) => {
    const tr = row([[name, "name"], [figures[0], "depth", 1], [figures[1], "in_flight", 1],
                    [figures[2], "dead_letters", 1], [figures[3], "connections", 1]],
                   {"data-testid": "channel-row", "data-channel": name, class: "pick"});
    if (name === selected) tr.classList.add("on");
    tr.addEventListener("click", () => select(name));
    return tr;
  });
}

async function refreshChannel(name) {
  const base = path("channels", name);
  const [detail, feed, letters] = await Promise.all([
    api("GET", base), api("GET", base + "/events?limit=50"),
    api("GET", base + "/dead-letters?limit=100")]);
  if (name !== selected) return;
  fill("limits", [[detail.channel, detail.stats]], ([channel, stats]) => {
    const dl = el("dl");
    for (const key of LIMITS) dl.append(el("dt", key), el("dd", channel[key], {"data-field": key}));
    dl.append(el("dt", "oldest message"), el("dd", stats.oldest_age_seconds === null ? "none"
      : Math.round(stats.oldest_age_seconds) + " s ago"));
    for (const [key, value] of Object.entries(stats.counters))
      dl.append(el("dt", key), el("dd", value));
    return dl;
  });
  // Where providers post: the URLs to paste into GitHub's or Stripe's webhook settings.
  fill("urls-body", Object.entries(detail.channel.webhook_urls || {}), ([id, url]) => row(
    [[id, "webhook_id"], [url, "url"]],
    {"data-testid": "webhook-url-row", "data-webhook-id": id}));
  fill("events-body", feed.events, (e) => row(
    [[new Date(e.time * 1000).toLocaleTimeString(), "time"], [e.type, "type"],
     [e.message_id, "message_id"], [e.consumer, "consumer"]],
    {"data-testid": "event-row", "data-type": e.type, "data-message-id": e.message_id}));
  fill("connections-body", detail.connections, (c) => {
    const tr = row([[c.connection_id, "connection_id"], [c.connector_id, "connector_id"],
                    [c.group, "group"], [c.transport, "transport"], [c.address, "address"],
                    [when(c.connected_at), "connected_at"], [when(c.seen_at), "seen_at"],
                    [c.in_flight, "in_flight", 1]],
                   {"data-testid": "connection-row", "data-connection-id": c.connection_id});
    return withButton(tr, "Disconnect", "disconnect", () => act(
      "DELETE", base + "/connections/" + path(c.connection_id), undefined,
      () => "Disconnected " + c.connection_id));
  });
  fill("tokens-body", detail.tokens, (t) => {
    const tr = row([[t.token_id, "token_id"], [t.label, "label"],
                    [when(t.created_at), "created_at"], [when(t.expires_at), "expires_at"]],
                   {"data-testid": "token-row", "data-token-id": t.token_id});
    return withButton(tr, "Revoke", "revoke", () => {
      if (confirm("Revoke token " + t.token_id + "? Connectors using it are disconnected."))
        act("DELETE", base + "/tokens/" + path(t.token_id), undefined,
            (a) => "Revoked " + a.revoked + ", disconnected " + a.disconnected);
    });
  });
  fill("dead-letters-body", letters.dead_letters, (d) => {
    const tr = row([[d.message_id, "message_id"], [d.webhook_id, "webhook_id"], [d.group, "group"],
                    [d.reason, "reason"], [d.attempts, "attempts", 1],
                    [d.delivery_attempts.map(tried).join("; "), "delivery_attempts"],
                    [when(d.dead_at), "dead_at"], [d.size, "size", 1]],
                   {"data-testid": "dead-letter-row", "data-message-id": d.message_id});
    return withButton(tr, "Replay", "replay", () => act(
      "POST", base + "/dead-letters/replay", {ids: [d.message_id]},
      (a) => "Replayed " + a.replayed));
  });
}

// One failed delivery of a dead letter: "#2 12:00:01 http_503 by laptop, 41 ms".
function tried(a) {
  return "#" + a.attempt + " " + new Date(a.time * 1000).toLocaleTimeString() + " " + a.outcome +
    (a.connector_id ? " by " + a.connector_id : "") + ", " +
    Math.round(a.duration_seconds * 1000) + " ms";
}

function select(name) {
  selected = name;
  for (const key of Object.keys(shown)) delete shown[key];
  $("detail").hidden = name === null;
  $("detail-name").textContent = name || "";
  $("new-token").hidden = true; $("new-token-value").textContent = "";
  for (const id of ["limits", "urls-body", "events-body", "connections-body", "tokens-body",
                    "dead-letters-body"]) $(id).replaceChildren();
  if (active) refresh();
}

// A button's action: call the API, say what happened, refresh at once.
async function act(method, route, body, describe) {
  try {
    const answer = await api(method, route, body);
    status(describe(answer), true);
    if (answer && answer.token) showSecret("new-token", answer.token);
  } catch (error) {
    if (error.status !== 401) status(error.message, false);
  }
  if (active) refresh();
}

function showSecret(id, token) {
  $(id + "-value").textContent = token;
  $(id).hidden = false;
}

function start(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("login-token").value);
  $("login-token").value = "";
  enter();
}
async function enter() {
  try {
    await api("GET", "channels");
  } catch (error) {
    return;
  }
  $("login-error").textContent = ""; show("app"); active = true; refresh();
}

function wire() {
  $("login-form").addEventListener("submit", start);
  $("logout").addEventListener("click", () => logout(""));
  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("create-name").value.trim();
    $("create-error").textContent = ""; $("created").hidden = true;
    try {
      const answer = await api("POST", "channels", {name});
      $("created-name").textContent = answer.channel.name;
      showSecret("created", answer.token);
      $("create-name").value = "";
      refresh();
    } catch (error) {
      if (error.status !== 401) $("create-error").textContent = error.message;
    }
  });
  $("issue-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const label = $("issue-label").value.trim();
    act("POST", path("channels", selected) + "/tokens", label ? {label} : {},
        (a) => "Issued token " + a.token_id);
  });
  $("rotate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const grace = Number($("rotate-grace").value);
    if (confirm("Rotate: every other token of " + selected + " ends in " + grace + " s."))
      act("POST", path("channels", selected) + "/rotate-token", {grace_seconds: grace},
          (a) => "Rotated: new token " + a.token_id + ", " + a.rotated.length + " ending");
  });
  $("replay-all").addEventListener("click", () => {
    if (confirm("Replay every dead letter of " + selected + "?"))
      act("POST", path("channels", selected) + "/dead-letters/replay", {all: true},
          (a) => "Replayed " + a.replayed);
  });
  $("purge-all").addEventListener("click", () => {
    if (confirm("Delete every dead letter of " + selected + " for good?"))
      act("DELETE", path("channels", selected) + "/dead-letters", {},
          (a) => "Purged " + a.purged);
  });
  for (const id of ["created", "new-token"]) {
    $(id + "-copy").addEventListener("click", () => {
      const text = $(id + "-value").textContent;
      if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
      window.getSelection().selectAllChildren($(id + "-value"));
    });
  }
}

wire();
if (sessionStorage.getItem(TOKEN_KEY)) enter();
else api("GET", "channels").then(() => show("login"), (error) => {
  if (error.code !== "admin_disabled") show("login");
});
"""

BODY = """
<h1>Webhook Connect</h1>
<section id="login" hidden><h2>Administrator login</h2>
<form id="login-form"><label>Admin token
<input id="login-token" type="password" autocomplete="current-password" required></label>
<button id="login-submit" type="submit">Log in</button></form>
<p id="login-error" class="err" role="alert"></p></section>
<section id="off" hidden><p id="admin-off" class="err">The admin API is off: start the cloud
with <code>--admin-token</code> to use the dashboard.</p></section>
<div id="app" hidden>
<p><button id="logout" type="button">Log out</button> <span id="status" role="status"></span>
<span id="refresh-error" class="err"></span></p>
<h2>Channels</h2>
<table><thead><tr><th>name</th><th>depth</th><th>in flight</th><th>dead letters</th>
<th>connectors</th></tr></thead><tbody id="channels-body"></tbody></table>
<p id="channels-body-empty" class="muted" hidden>No channels yet.</p>
<form id="create-form"><label>New channel <input id="create-name" required maxlength="128"></label>
<button id="create-submit" type="submit">Create channel</button></form>
<span id="create-error" class="err"></span>
<p id="created" hidden>Channel <b id="created-name"></b> created. Its connector token, shown
only this once (copy it now): <code id="created-value" class="secret"></code>
<button id="created-copy" type="button">Copy</button></p>
<section id="detail" hidden><h2>Channel <span id="detail-name"></span></h2>
<h2>Limits and counters</h2><div id="limits"></div><p id="limits-empty" hidden></p>
<h2>Webhook URLs</h2><table><thead><tr><th>webhook</th><th>URL (paste it into the
provider's webhook settings)</th></tr></thead><tbody id="urls-body"></tbody></table>
<p id="urls-body-empty" class="muted" hidden>No webhook feeds this channel: add one with
this channel to webhooks.json.</p>
<h2>Recent activity</h2><div id="feed"><table><thead><tr><th>time</th><th>event</th>
<th>message</th><th>consumer</th></tr></thead><tbody id="events-body"></tbody></table>
<p id="events-body-empty" class="muted" hidden>Nothing yet.</p></div>
<h2>Connections</h2><table><thead><tr><th>connection</th><th>connector</th><th>group</th>
<th>transport</th><th>address</th><th>connected</th><th>seen</th><th>in flight</th><th></th>
</tr></thead><tbody id="connections-body"></tbody></table>
<p id="connections-body-empty" class="muted" hidden>No connector is connected.</p>
<h2>Tokens</h2><table><thead><tr><th>token id</th><th>label</th><th>created</th>
<th>expires</th><th></th></tr></thead><tbody id="tokens-body"></tbody></table>
<p id="tokens-body-empty" class="muted" hidden>No tokens.</p>
<form id="issue-form"><label>Label <input id="issue-label"></label>
<button id="issue-submit" type="submit">Issue token</button></form>
<form id="rotate-form"><label>Grace seconds <input id="rotate-grace" type="number" min="0"
value="3600" required></label><button id="rotate-submit" type="submit">Rotate</button></form>
<p id="new-token" hidden>New token, shown only this once (copy it now):
<code id="new-token-value" class="secret"></code>
<button id="new-token-copy" type="button">Copy</button></p>
<h2>Dead letters</h2><table><thead><tr><th>message</th><th>webhook</th><th>group</th>
<th>reason</th><th>attempts</th><th>failed deliveries</th><th>dead since</th><th>bytes</th>
<th></th></tr></thead>
<tbody id="dead-letters-body"></tbody></table>
<p id="dead-letters-body-empty" class="muted" hidden>No dead letters.</p>
<p><button id="replay-all" type="button">Replay all</button>
<button id="purge-all" type="button">Purge all</button></p>
</section></div>
"""

PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    "<title>Webhook Connect: dashboard</title>"
    f"<style>{STYLE}</style></head><body>{BODY}<script>{SCRIPT}</script></body></html>\n"
)


def _source_hash(text: str) -> str:
    """A CSP source for exactly this inline script or style (CSP 3, hash-source)."""
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


HEADERS = {
    "content-security-policy": (
        f"default-src 'none'; script-src {_source_hash(SCRIPT)}; "
        f"style-src {_source_hash(STYLE)}; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


async def dashboard(request: Request) -> HTMLResponse:
    """``GET /ui``: the dashboard page (public: it holds no data; it asks for the admin token)."""
    return HTMLResponse(PAGE, headers=HEADERS)
