// Pacemaker from a browser, with no library and no build step: copy what you need.
//
// - POST /v1/tasks with `stream: true` answers Server-Sent Events; fetch() reads them as they
//   arrive (EventSource cannot send an Authorization header or a body).
// - A background task goes on when the page goes away. localStorage keeps its id and the seq of
//   the last event shown, and after a reload GET /v1/tasks/{id}/events with `Last-Event-ID`
//   sends only what came after.
// - Cancel: POST /v1/tasks/{id}/cancel for a background task; otherwise aborting the fetch is
//   enough (the server ends a task whose client has gone).
"use strict";

const $ = (id) => document.getElementById(id);
const SAVED = "pacemaker.example.task"; // localStorage: {taskId, lastSeq, output, tools, baseUrl, query, done}
const KEY = "pacemaker.example.key"; // sessionStorage: gone when the tab closes

let running = null; // {controller, taskId, background}

// --- Server-Sent Events over fetch ---------------------------------------------------------------

// Yields {id, event, data} for each event of a text/event-stream response, as it arrives.
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = { id: null, event: "message", data: [] };
      for (const line of block.split(/\r?\n/)) {
        if (line === "" || line.startsWith(":")) continue; // ": ping" keeps proxies from closing idle streams
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
        else if (field === "event") event.event = text;
      }
      if (event.data.length) yield { ...event, data: event.data.join("\n") };
    }
  }
}

// --- Talking to Pacemaker ------------------------------------------------------------------------

function headers(extra = {}) {
  return { Authorization: `Bearer ${$("api-key").value.trim()}`, ...extra };
}

function baseUrl() {
  return $("base-url").value.trim().replace(/\/+$/, "");
}

// Errors are application/problem+json: {code, detail, ...}.
async function describeFailure(response) {
  try {
    const problem = await response.json();
    return `${response.status} ${problem.code || ""}: ${problem.detail || problem.title || ""}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function follow(response, background) {
  if (!response.ok) throw new Error(await describeFailure(response));
  for await (const message of readEvents(response)) {
    render(JSON.parse(message.data), background);
  }
}

async function send(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  clear();
  const background = $("background").checked;
  const body = { query: $("query").value, mode: $("mode").value, stream: true, background };
  start({ background });
  try {
    const response = await fetch(`${baseUrl()}/v1/tasks`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal: running.controller.signal,
    });
    await follow(response, background);
  } catch (error) {
    fail(error);
  } finally {
    stop();
  }
}

async function resume() {
  const saved = JSON.parse(localStorage.getItem(SAVED) || "null");
  const key = sessionStorage.getItem(KEY);
  if (key) $("api-key").value = key;
  if (!saved || saved.done) return;
  if (saved.baseUrl) $("base-url").value = saved.baseUrl;
  if (saved.query) $("query").value = saved.query;
  $("output").textContent = saved.output;
  for (const call of saved.tools) addToolCall(call);
  $("task-id").textContent = saved.taskId;
  if (!key) return setStatus("failed", "enter the key to resume the task");
  start({ background: true, taskId: saved.taskId });
  setStatus("running", `resuming after event ${saved.lastSeq}`);
  try {
    const response = await fetch(`${baseUrl()}/v1/tasks/${encodeURIComponent(saved.taskId)}/events`, {
      headers: headers({ Accept: "text/event-stream", "Last-Event-ID": String(saved.lastSeq) }),
      signal: running.controller.signal,
    });
    await follow(response, true);
  } catch (error) {
    fail(error);
  } finally {
    stop();
  }
}

async function cancel() {
  if (!running) return;
  if (running.background && !running.taskId) {
    running.cancelRequested = true;
  } else if (running.background) {
    // The stream stays open and ends with task.failed (code: cancelled).
    const response = await fetch(`${baseUrl()}/v1/tasks/${encodeURIComponent(running.taskId)}/cancel`, {
      method: "POST",
      headers: headers(),
    });
    if (!response.ok && response.status !== 409) setStatus("failed", await describeFailure(response));
  } else {
    running.controller.abort();
  }
}

// --- Rendering -----------------------------------------------------------------------------------

function render(event, background) {
  if (running && !running.taskId) {
    running.taskId = event.task_id;
    if (running.cancelRequested) cancel(); // Cancel was pressed before the task had an id
  }
  $("task-id").textContent = event.task_id;
  switch (event.type) {
    case "task.started":
      setStatus("running", `running on ${event.model}`);
      break;
    case "token.delta":
      $("output").textContent += event.delta;
      break;
    case "tool.call":
      addToolCall({ call_id: event.call_id, tool: event.tool, arguments: event.arguments });
      break;
    case "tool.result":
      finishToolCall(event);
      break;
    case "task.completed":
      $("cost").textContent = `$${event.cost_usd.toFixed(6)}`;
      $("tokens").textContent = `${event.usage.prompt_tokens} in, ${event.usage.completion_tokens} out`;
      setStatus("completed", "completed");
      break;
    case "task.failed":
      setStatus(event.code === "cancelled" ? "cancelled" : "failed", `${event.code}: ${event.detail}`);
      break;
  }
  if (background) save(event);
}

function save(event) {
  const saved = JSON.parse(localStorage.getItem(SAVED) || "null") || { tools: [] };
  const tools = [...$("tools").children].map((item) => JSON.parse(item.dataset.call));
  const done = event.type === "task.completed" || event.type === "task.failed";
  localStorage.setItem(
    SAVED,
    JSON.stringify({
      ...saved,
      taskId: event.task_id,
      lastSeq: event.seq,
      output: $("output").textContent,
      tools,
      baseUrl: baseUrl(),
      query: $("query").value,
      done,
    }),
  );
}

function addToolCall(call) {
  const item = document.createElement("li");
  item.dataset.callId = call.call_id;
  item.dataset.call = JSON.stringify(call);
  item.textContent = `${call.tool}(${JSON.stringify(call.arguments)})`;
  if ("result" in call || "error" in call) item.textContent += describeResult(call);
  $("tools").append(item);
}

function finishToolCall(event) {
  const item = [...$("tools").children].find((li) => li.dataset.callId === event.call_id);
  if (!item) return addToolCall(event); // resumed after its tool.call
  const call = { ...JSON.parse(item.dataset.call), result: event.result, error: event.error };
  item.dataset.call = JSON.stringify(call);
  item.textContent += describeResult(call);
}

function describeResult(call) {
  return call.error ? ` failed: ${call.error}` : ` = ${JSON.stringify(call.result)}`;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function clear() {
  localStorage.removeItem(SAVED);
  $("output").textContent = "";
  $("tools").replaceChildren();
  for (const id of ["task-id", "cost", "tokens"]) $(id).textContent = "-";
}

function start({ background, taskId = null }) {
  running = { controller: new AbortController(), background, taskId };
  $("send").disabled = true;
  $("cancel").disabled = false;
}

function stop() {
  running = null;
  $("send").disabled = false;
  $("cancel").disabled = true;
}

function fail(error) {
  if (error.name === "AbortError") return setStatus("cancelled", "cancelled (the request was aborted)");
  if (error instanceof TypeError) {
    // What fetch reports for a refused CORS preflight as for a server that is down.
    return setStatus("failed", `could not reach ${baseUrl()}: is it running, and is this page's origin in server.cors.allow_origins?`);
  }
  setStatus("failed", error.message);
}

$("task-form").addEventListener("submit", send);
$("cancel").addEventListener("click", cancel);
resume();
