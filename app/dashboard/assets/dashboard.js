// Pacemaker's live dashboard: one WebSocket, `subscribe` to the activity topic, render each snapshot.
// Plain JavaScript, no build step; the key lives in this tab's sessionStorage only.
"use strict";

(() => {
  const KEY_STORAGE = "pacemaker.dashboard.key";
  const ROOT = document.body.dataset.root || "";
  const HISTORY_POINTS = 600; // ten minutes at one snapshot a second
  const STALE_AFTER_MS = 5000;
  const MAX_TASKS = 50;
  const FINAL = new Set(["completed", "failed", "cancelled"]);

  const $ = (id) => document.getElementById(id);
  const state = {
    key: sessionStorage.getItem(KEY_STORAGE),
    socket: null,
    failures: 0, // handshakes in a row that never opened
    lastSnapshot: 0,
    tasks: new Map(), // id -> summary
    detail: null, // the task whose events are shown
    history: null, // {t: [], requests_per_s: [], ...}
    charts: [],
  };

  // --- formatting -------------------------------------------------------------------------------

  const number = (value, digits = 2) =>
    value == null ? "–" : value >= 100 ? Math.round(value).toLocaleString("en") : value.toFixed(digits);
  const usd = (value) => (value == null ? "–" : "$" + (value >= 1 ? value.toFixed(2) : value.toFixed(6)));
  const ms = (value) =>
    value == null ? "–" : value < 10 ? value.toFixed(2) + " ms" : value < 1000 ? Math.round(value) + " ms" : (value / 1000).toFixed(2) + " s";
  // Axis ticks: two significant digits, so small costs do not all read 0.
  const tick = (value) =>
    value === 0 ? "0" : Math.abs(value) >= 1000 ? (value / 1000).toFixed(1) + "k" : String(Number(value.toPrecision(2)));
  const seconds = (value) => {
    const whole = Math.round(value);
    return whole < 60 ? whole + " s" : Math.floor(whole / 60) + " min " + (whole % 60) + " s";
  };

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function fillTable(id, rows, columns, render) {
    const body = $(id).tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const row = body.insertRow();
      const td = cell(row, "none", "empty");
      td.colSpan = columns;
      return;
    }
    for (const item of rows) render(body.insertRow(), item);
  }

  // --- connection -------------------------------------------------------------------------------

  function setStatus(name, text) {
    const status = $("status");
    status.dataset.state = name;
    status.textContent = text;
  }

  function notice(text) {
    const element = $("notice");
    element.textContent = text || "";
    element.hidden = !text;
  }

  function socketUrl() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + ROOT + "/v1/ws";
  }

  function connect() {
    if (!state.key) return;
    setStatus(state.failures ? "reconnecting" : "connecting", state.failures ? "reconnecting…" : "connecting…");
    // The key travels as the second subprotocol entry: never in the URL, never echoed back.
    const socket = new WebSocket(socketUrl(), ["pacemaker.bearer", state.key]);
    let opened = false;
    state.socket = socket;
    socket.onopen = () => {
      opened = true;
      socket.send(JSON.stringify({ type: "subscribe", topic: "activity" }));
      if (state.detail) follow(state.detail);
    };
    socket.onmessage = (message) => receive(JSON.parse(message.data));
    socket.onclose = (close) => {
      if (state.socket !== socket) return; // replaced or signed out
      state.socket = null;
      if (close.code === 4401) return signOut("The key was revoked.");
      state.failures = opened ? 1 : state.failures + 1;
      const delay = Math.min(5000, 250 * 2 ** Math.min(state.failures, 5));
      setStatus("reconnecting", "reconnecting…");
      if (state.failures >= 3) notice("Cannot reach the server, or it refuses this key; retrying.");
      setTimeout(() => state.key && !state.socket && connect(), delay);
    };
  }

  function signIn(key) {
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("login").hidden = true;
    $("logout").hidden = false;
    state.failures = 0;
    connect();
  }

  function signOut(why) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    const socket = state.socket;
    state.socket = null;
    if (socket) socket.close();
    $("login").hidden = false;
    $("logout").hidden = true;
    setStatus(why ? "refused" : "signed-out", why ? "refused" : "signed out");
    notice(why || "");
  }

  setInterval(() => {
    if (state.socket && state.lastSnapshot && Date.now() - state.lastSnapshot > STALE_AFTER_MS) {
      setStatus("stale", "no update for " + Math.round((Date.now() - state.lastSnapshot) / 1000) + " s");
    }
    renderTasks(); // running tasks' durations go on
  }, 1000);

  // --- messages -------------------------------------------------------------------------------------

  function receive(message) {
    if (message.type === "activity.snapshot") return snapshot(message);
    if (message.type === "activity.task") return upsertTask(message, true);
    if (message.type === "error") return failure(message);
    if (message.task_id && message.task_id === state.detail) return taskEvent(message);
  }

  function failure(message) {
    if (message.code === "forbidden") return signOut("This key is not an admin key: the dashboard needs one.");
    if (message.ref === "detail") {
      if (message.code === "events_not_kept") return showRecord(state.detail);
      if (message.code !== "already_subscribed" && message.code !== "not_found") $("detail-state").textContent = message.detail;
    }
  }

  function snapshot(data) {
    state.lastSnapshot = Date.now();
    state.failures = 0;
    notice("");
    setStatus("live", "live");
    $("instances").textContent =
      data.instances + (data.instances === 1 ? " instance" : " instances") + (data.shared === "unavailable" ? " (Redis unavailable)" : "");
    const requests = data.requests, active = data.active, totals = data.totals;
    $("requests-per-s").textContent = number(requests.per_s);
    $("errors-per-s").textContent = number(requests.errors_per_s);
    $("sse-streams").textContent = active.sse_streams;
    $("websockets").textContent = active.websockets;
    $("background-tasks").textContent = active.background_tasks;
    $("running-tasks").textContent = active.running_tasks;
    $("tokens-per-s").textContent = number(totals.tokens_in_per_s, 1) + " · " + number(totals.tokens_out_per_s, 1);
    $("cost-per-min").textContent = usd(totals.cost_per_min_usd);
    $("cost-today").textContent = usd(totals.cost_today_usd);
    renderModels(data.models);
    renderCounts("errors", data.requests.errors_by_code);
    renderCounts("statuses", data.requests.by_status);
    renderBreakers(data.breakers);
    renderSystem(data);
    for (const task of data.recent_tasks) upsertTask(task, false);
    renderTasks();
    chart(data);
  }

  function renderModels(models) {
    fillTable("models", Object.entries(models), 11, (row, [name, m]) => {
      row.dataset.model = name;
      cell(row, name);
      cell(row, number(m.requests_per_s));
      cell(row, number(m.errors_per_s));
      cell(row, number(m.tokens_in_per_s, 1));
      cell(row, number(m.tokens_out_per_s, 1));
      cell(row, usd(m.cost_per_min_usd));
      cell(row, usd(m.cost_today_usd));
      cell(row, ms(m.latency_ms.p50));
      cell(row, ms(m.latency_ms.p95));
      cell(row, ms(m.ttft_ms.p50));
      cell(row, ms(m.ttft_ms.p95));
    });
  }

  function renderCounts(id, counts) {
    fillTable(id, Object.entries(counts), 2, (row, [name, perSecond]) => {
      cell(row, name);
      cell(row, number(perSecond));
    });
  }

  function renderBreakers(breakers) {
    fillTable("breakers", breakers, 5, (row, b) => {
      row.dataset.breaker = b.kind + ":" + b.name;
      row.dataset.state = b.state;
      cell(row, b.name);
      cell(row, b.kind);
      cell(row, b.state.replace("_", "-"), "state state-" + b.state);
      cell(row, b.state === "open" ? (b.open_remaining_s > 0 ? "another " + seconds(b.open_remaining_s) : "probe due") : "–");
      cell(row, b.open_instances + " of " + b.instances);
    });
  }

  function renderSystem(data) {
    const limiter = data.limiter, active = data.active;
    $("limiter").textContent =
      limiter.backend === "redis"
        ? "Redis, " + limiter.policy.replace("_", " ") + (limiter.degraded ? " — DEGRADED on " + limiter.degraded_instances + " instance(s)" : ", answering")
        : "in process (memory)";
    const audit = active.audit;
    $("audit").textContent = audit
      ? audit.queue_depth + " queued, " + audit.spool_rows + " spooled on disk" + (audit.database_ok ? "" : " — database not taking writes") +
        (audit.spool_error ? " — journal failing" : "")
      : "off";
    const records = active.task_records;
    $("task-records").textContent = records.queue_depth + " queued, " + records.spool_rows + " spooled on disk";
    const sandbox = active.sandbox;
    $("sandbox").textContent = sandbox ? sandbox.busy + " of " + sandbox.workers + " workers busy, " + sandbox.queued + " queued" : "off";
  }

  // --- tasks ------------------------------------------------------------------------------------------

  function upsertTask(task, fresh) {
    const known = state.tasks.get(task.id);
    // A snapshot may be older than a task message already heard: never go back from an end to running.
    if (known && FINAL.has(known.status) && !FINAL.has(task.status)) return;
    state.tasks.set(task.id, task);
    if (state.tasks.size > MAX_TASKS) {
      const oldest = [...state.tasks.values()].sort(byStart)[MAX_TASKS];
      if (oldest) state.tasks.delete(oldest.id);
    }
    if (fresh) renderTasks();
  }

  const byStart = (a, b) => (b.started_at || "").localeCompare(a.started_at || "");

  function renderTasks() {
    const tasks = [...state.tasks.values()].sort(byStart);
    fillTable("tasks", tasks, 7, (row, t) => {
      row.dataset.taskId = t.id;
      row.dataset.status = t.status;
      if (t.id === state.detail) row.className = "selected";
      cell(row, t.id.slice(0, 14), "id").title = t.id;
      cell(row, t.key_prefix || "–");
      cell(row, t.model || "–");
      cell(row, t.status + (t.error_code && t.status !== "cancelled" ? " (" + t.error_code + ")" : ""), "status status-" + t.status);
      cell(row, t.prompt_tokens + " · " + t.completion_tokens, "tokens");
      cell(row, usd(t.cost_usd), "cost");
      const running = t.duration_ms == null && t.started_at ? Date.now() - Date.parse(t.started_at) : null;
      cell(row, t.duration_ms != null ? ms(t.duration_ms) : running != null ? ms(Math.max(0, running)) + "…" : "–", "duration");
    });
  }

  function openDetail(id) {
    if (state.detail && state.detail !== id && state.socket) {
      state.socket.send(JSON.stringify({ type: "unsubscribe", task_id: state.detail, ref: "detail" }));
    }
    state.detail = id;
    $("detail").hidden = false;
    $("detail-id").textContent = id;
    $("detail-state").textContent = "following…";
    $("detail-output").textContent = "";
    $("detail-events").replaceChildren();
    renderTasks();
    follow(id);
  }

  function follow(id) {
    // Background tasks keep their events: replayed from the first, then live. Others answer events_not_kept.
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      $("detail-output").textContent = "";
      $("detail-events").replaceChildren();
      state.socket.send(JSON.stringify({ type: "subscribe", task_id: id, after: 0, ref: "detail" }));
    }
  }

  function taskEvent(event) {
    if (event.type === "token.delta") {
      $("detail-output").textContent += event.delta;
      return;
    }
    const item = document.createElement("li");
    const fields = { ...event };
    for (const name of ["type", "task_id", "seq", "ref", "output"]) delete fields[name];
    item.textContent = event.seq + " " + event.type + " " + JSON.stringify(fields).slice(0, 300);
    $("detail-events").append(item);
    if (event.type === "task.completed") $("detail-state").textContent = "completed";
    else if (event.type === "task.failed") $("detail-state").textContent = "failed: " + event.code;
    else if (event.type === "task.started") $("detail-state").textContent = "running on " + event.model;
  }

  async function showRecord(id) {
    // Not a background task: its events were never kept, but its record has the outcome.
    $("detail-state").textContent = "not a background task: its events are not kept; its record:";
    try {
      const response = await fetch(ROOT + "/v1/tasks/" + encodeURIComponent(id), { headers: { Authorization: "Bearer " + state.key } });
      const record = await response.json();
      if (state.detail !== id) return;
      $("detail-output").textContent = record.output ?? (record.error ? record.error.code + ": " + record.error.detail : record.status);
      const item = document.createElement("li");
      item.textContent = record.status + ", " + JSON.stringify(record.usage) + ", $" + record.cost_usd;
      $("detail-events").replaceChildren(item);
    } catch (error) {
      $("detail-state").textContent = "could not read its record: " + error;
    }
  }

  // --- charts -----------------------------------------------------------------------------------------

  const SERIES = [
    ["chart-rates", "requests and errors per second", [["requests_per_s", "req/s", "#2e6bd8"], ["errors_per_s", "err/s", "#c4320a"]]],
    ["chart-tokens", "tokens per second", [["tokens_in_per_s", "in", "#7a5af8"], ["tokens_out_per_s", "out", "#12b76a"]]],
    ["chart-cost", "cost per minute (USD)", [["cost_per_min_usd", "$/min", "#b54708"]]],
  ];

  function chart(data) {
    if (typeof uPlot === "undefined") return; // the page still works without its charts
    if (data.history) {
      state.history = data.history;
    } else if (state.history) {
      state.history.t.push(data.at);
      state.history.requests_per_s.push(data.requests.per_s);
      state.history.errors_per_s.push(data.requests.errors_per_s);
      state.history.tokens_in_per_s.push(data.totals.tokens_in_per_s);
      state.history.tokens_out_per_s.push(data.totals.tokens_out_per_s);
      state.history.cost_per_min_usd.push(data.totals.cost_per_min_usd);
      for (const column of Object.values(state.history)) column.splice(0, column.length - HISTORY_POINTS);
    } else {
      return; // the first snapshot of a subscription carries the history
    }
    if (!state.charts.length) {
      for (const [id, title, series] of SERIES) {
        const element = $(id);
        const options = {
          title,
          width: Math.max(200, element.clientWidth - 8),
          height: 170,
          cursor: { drag: { x: false, y: false } },
          scales: { x: { time: true } },
          axes: [{}, { size: 68, values: (_plot, ticks) => ticks.map(tick) }],
          series: [{}, ...series.map(([, label, stroke]) => ({ label, stroke, width: 1.5 }))],
        };
        state.charts.push({ plot: new uPlot(options, [[]], element), element, fields: series.map(([field]) => field) });
      }
      new ResizeObserver(() => {
        for (const { plot, element } of state.charts) plot.setSize({ width: Math.max(200, element.clientWidth - 8), height: 170 });
      }).observe($("chart-rates").parentElement);
    }
    for (const { plot, fields } of state.charts) {
      plot.setData([state.history.t, ...fields.map((field) => state.history[field])]);
    }
  }

  // --- start ------------------------------------------------------------------------------------------

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    if (key) signIn(key);
  });
  $("logout").addEventListener("click", () => signOut());
  // One listener for the table, whose rows are redrawn every second.
  $("tasks").tBodies[0].addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-task-id]");
    if (row) openDetail(row.dataset.taskId);
  });
  $("detail-close").addEventListener("click", () => {
    if (state.detail && state.socket) state.socket.send(JSON.stringify({ type: "unsubscribe", task_id: state.detail, ref: "detail" }));
    state.detail = null;
    $("detail").hidden = true;
    renderTasks();
  });
  if (state.key) signIn(state.key);
})();
