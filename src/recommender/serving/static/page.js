// The page: plain DOM calls on the service's own JSON API, nothing from another host.
// Text from the data (titles, ids) only ever goes in through textContent, never as HTML.
"use strict";

const K = 10;
const HISTORY_SHOWN = 20;
const CARD_METRICS = ["hr@10", "ndcg@10", "coverage@10"]; // of the run's validation metrics
const HISTORY_FETCHED = 1000; // enough to find the items behind the explanations
const session = []; // item ids an anonymous visitor clicked, oldest first
let firstRecommendations = true;

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const json = await response.json();
  if (!response.ok) throw new Error(json.detail || response.statusText);
  return json;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(error) {
  $("status").textContent = String(error.message || error);
}

// One list of items: each is a button that adds the item to the session; a recommendation
// also shows its score and, when it has one, the one-line explanation.
function renderItems(list, items, supporting = new Set()) {
  list.replaceChildren(...items.map((item) => {
    const li = el("li");
    li.dataset.itemId = item.item_id;
    if (supporting.has(item.item_id)) li.classList.add("supports");
    const button = el("button", "item");
    button.type = "button";
    button.title = "add to the session";
    button.append(el("span", "title", item.title || item.item_id));
    if (item.title) button.append(el("span", "id", item.item_id));
    if (item.score !== undefined) button.append(el("span", "score", item.score.toFixed(3)));
    button.addEventListener("click", () => addToSession(item));
    li.append(button);
    if (item.explanation) li.append(el("p", "why", item.explanation.text));
    return li;
  }));
}

async function loadModelCard() {
  const info = await api("/v1/model");
  const rows = [
    ["model", info.model],
    ["version", info.version],
    ["trained", info.created_at ? info.created_at.slice(0, 16).replace("T", " ") : "?"],
    ["users", info.n_users.toLocaleString("en")],
    ["items", info.n_items.toLocaleString("en")],
    ["retrieval", info.retrieval],
    ...CARD_METRICS.filter((name) => name in info.valid_metrics)
      .map((name) => [`valid ${name}`, info.valid_metrics[name].toFixed(4)]),
  ];
  $("model-card").replaceChildren(...rows.flatMap(([name, value]) => {
    const dd = el("dd", "", String(value));
    dd.dataset.field = name;
    return [el("dt", "", name), dd];
  }));
}

async function search() {
  const q = $("search").value;
  const found = await api(`/v1/items?q=${encodeURIComponent(q)}&limit=${K}`);
  if (found.query === $("search").value) renderItems($("search-results"), found.items);
}

async function loadUsers() {
  const { user_ids: users } = await api("/v1/users?limit=12");
  $("users").replaceChildren(...users.map((user) => {
    const chip = el("button", "chip", user);
    chip.type = "button";
    chip.addEventListener("click", () => pickUser(user).catch(showError));
    return chip;
  }));
}

async function pickUser(user) {
  $("user").value = user;
  const id = encodeURIComponent(user);
  const [recs, history] = await Promise.all([
    api(`/v1/users/${id}/recommendations?k=${K}&explain=true`),
    api(`/v1/users/${id}/history?n=${HISTORY_FETCHED}`),
  ]);
  const supporting = new Set(recs.items.flatMap((i) => i.explanation?.supporting_items || []));
  renderItems($("user-recs"), recs.items);
  // The history items behind a recommendation first, then the rest, HISTORY_SHOWN in all.
  const shown = [
    ...history.items.filter((i) => supporting.has(i.item_id)),
    ...history.items.filter((i) => !supporting.has(i.item_id)),
  ].slice(0, HISTORY_SHOWN);
  renderItems($("history"), shown, supporting);
  $("user-note").textContent = recs.fallback
    ? "unknown user: the most popular items"
    : "with the history items behind each";
  $("history-note").textContent = history.known
    ? `${shown.length} of ${history.n_items}; highlighted: behind a recommendation`
    : "none: the model has not seen this user";
  const url = new URL(window.location);
  url.searchParams.set("user", user);
  window.history.replaceState(null, "", url);
  if (firstRecommendations) {
    firstRecommendations = false;
    performance.mark("first-recommendations");
  }
}

function addToSession(item) {
  if (session.includes(item.item_id)) return;
  session.push(item.item_id);
  const chip = el("button", "chip", item.title || item.item_id);
  chip.type = "button";
  chip.dataset.itemId = item.item_id;
  chip.title = "remove from the session";
  chip.addEventListener("click", () => {
    session.splice(session.indexOf(item.item_id), 1);
    chip.remove();
    refreshSession().catch(showError);
  });
  $("session").append(chip);
  refreshSession().catch(showError);
}

async function refreshSession() {
  if (!session.length) {
    $("session-recs").replaceChildren();
    return;
  }
  const asked = session.slice();
  const body = await api("/v1/recommendations", { session_item_ids: asked, k: K });
  if (JSON.stringify(asked) === JSON.stringify(session)) {
    renderItems($("session-recs"), body.results[0].items);
  }
}

function start() {
  let timer;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => search().catch(showError), 150);
  });
  $("user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const user = $("user").value.trim();
    if (user) pickUser(user).catch(showError);
  });
  $("clear-session").addEventListener("click", () => {
    session.length = 0;
    $("session").replaceChildren();
    refreshSession().catch(showError);
  });
  const user = new URLSearchParams(window.location.search).get("user");
  const loads = [loadModelCard(), search(), loadUsers()];
  if (user) loads.push(pickUser(user));
  Promise.all(loads).catch(showError);
}

start();
