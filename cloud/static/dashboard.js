"use strict";
const TOKEN_KEY = "webhook-connect-admin-token";
const REFRESH_MS = 2000;
// Every limit of a channel (shared/limits.py), handed over by the page in a JSON data block.
const LIMITS = JSON.parse(document.getElementById("page-data").textContent).limits;
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
