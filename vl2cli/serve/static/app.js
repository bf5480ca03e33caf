// vl2's page: upload a document to /v1/documents/{task}?stream=true and show each page record as it arrives.
// Plain JS, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form"), drop = $("drop"), fileInput = $("file"), statusLine = $("status"), results = $("results");
let chosen = null;

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function inline(text) {
  return escapeHtml(text)
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*]+)\*/g, "$1<em>$2</em>");
}

function tableHtml(columns, rows) {
  const head = columns.length ? "<tr>" + columns.map((c) => `<th>${escapeHtml(c)}</th>`).join("") + "</tr>" : "";
  const body = rows.map((r) => "<tr>" + r.map((c) => `<td>${escapeHtml(c)}</td>`).join("") + "</tr>").join("");
  return `<table>${head}${body}</table>`;
}

// A small markdown renderer (headings, lists, pipe tables, code, paragraphs); everything is escaped first.
function markdown(text) {
  const lines = String(text || "").split("\n"), out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^```/.test(line)) {
      const code = [];
      for (i++; i < lines.length && !/^```/.test(lines[i]); i++) code.push(lines[i]);
      out.push(`<pre>${escapeHtml(code.join("\n"))}</pre>`); i++; continue;
    }
    if (/^\s*\|.*\|\s*$/.test(line)) {
      const block = [];
      for (; i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i]); i++) block.push(lines[i]);
      const cells = (l) => l.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const rows = block.filter((l) => !/^\s*\|[\s:|-]+\|\s*$/.test(l)).map(cells);
      out.push(tableHtml(rows[0] || [], rows.slice(1))); continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) { out.push(`<h${heading[1].length + 2}>${inline(heading[2])}</h${heading[1].length + 2}>`); i++; continue; }
    if (/^\s*([-*]|\d+\.)\s+/.test(line)) {
      const items = [];
      for (; i < lines.length && /^\s*([-*]|\d+\.)\s+/.test(lines[i]); i++) items.push(lines[i].replace(/^\s*([-*]|\d+\.)\s+/, ""));
      out.push("<ul>" + items.map((t) => `<li>${inline(t)}</li>`).join("") + "</ul>"); continue;
    }
    if (!line.trim()) { i++; continue; }
    const para = [];
    for (; i < lines.length && lines[i].trim() && !/^(#|```|\s*\||\s*([-*]|\d+\.)\s)/.test(lines[i]); i++) para.push(lines[i]);
    if (!para.length) { para.push(line); i++; }
    out.push(`<p>${inline(para.join(" "))}</p>`);
  }
  return out.join("\n");
}

function drawBoxes(figure, record) {
  const canvas = figure.querySelector("canvas"), img = figure.querySelector("img");
  const width = record.width || (img && img.naturalWidth) || 1, height = record.height || (img && img.naturalHeight) || 1;
  canvas.width = width; canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.lineWidth = Math.max(2, width / 300);
  ctx.font = `${Math.max(12, width / 50)}px sans-serif`;
  for (const obj of record.objects || []) {
    const [x0, y0, x1, y1] = obj.box;
    ctx.strokeStyle = "#e11d48"; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillStyle = "#e11d48"; ctx.fillText(obj.label || "", x0 + 3, Math.max(y0 - 4, 14));
  }
  figure.dataset.boxes = String((record.objects || []).length);
}

function figureFor(record) {
  const figure = document.createElement("div");
  figure.className = "figure";
  if (chosen && chosen.type.startsWith("image/")) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(chosen);
    img.alt = record.source;
    figure.appendChild(img);
    img.addEventListener("load", () => drawBoxes(figure, record));
  } else {  // a PDF page: the boxes on a frame of the page's size
    figure.style.width = "min(100%, 40em)";
    figure.style.aspectRatio = `${record.width || 1} / ${record.height || 1}`;
    figure.style.border = "1px solid #c4cad4";
  }
  figure.appendChild(document.createElement("canvas"));
  if (!figure.querySelector("img")) setTimeout(() => drawBoxes(figure, record));
  return figure;
}

function answerHtml(record) {
  const f = record;  // the task's fields sit at the top of a record (see the page-record schema)
  if (record.status !== "ok") return `<p>${escapeHtml(record.error || record.status)}</p>`;
  switch (record.task) {
    case "table":
      return (f.tables || []).map((t) => tableHtml(t.columns || [], t.rows || [])).join("") || markdown(record.answer);
    case "chart":
      return `<p>${inline(f.description || "")}</p>` + (f.data ? tableHtml(f.data.columns || [], f.data.rows || []) : "");
    case "extract":
      return `<pre>${escapeHtml(JSON.stringify(f.data, null, 2))}</pre>`;
    case "ground": case "caption":
      return `<p>${inline(f.caption || record.answer || "")}</p>`;
    default:
      return markdown(record.answer);
  }
}

function showRecord(record) {
  const page = document.createElement("article");
  page.className = "page" + (record.status === "ok" ? "" : " failed");
  page.dataset.task = record.task;
  page.innerHTML = `<h2>${escapeHtml(record.source)} · page ${record.page} · ${escapeHtml(record.task)}</h2>` +
    `<div class="answer">${answerHtml(record)}</div>`;
  if ((record.task === "ground" || record.task === "caption") && record.status === "ok") page.appendChild(figureFor(record));
  const raw = document.createElement("details");
  raw.innerHTML = `<summary>raw record</summary><pre>${escapeHtml(JSON.stringify(record, null, 1))}</pre>`;
  page.appendChild(raw);
  results.appendChild(page);
}

function say(text, error) {
  statusLine.textContent = text;
  statusLine.className = error ? "error" : "";
}

function choose(file) {
  chosen = file;
  $("drop-text").textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KB)` : "Drop a PDF or an image here";
}

// What each task writes (vl2cli/tasks.py): besides the page view, the body `vl2 TASK -f FORMAT` prints.
// As vl2cli/tasks.py TASKS[...].formats (tests/test_web.py holds the two equal).
const FORMATS = {ocr: ["markdown", "text", "json", "jsonl", "docling"], ask: ["markdown", "text", "json", "jsonl"],
  table: ["json", "jsonl", "csv", "markdown", "html"], chart: ["markdown", "text", "json", "jsonl"],
  ground: ["markdown", "text", "json", "jsonl"], caption: ["markdown", "text", "json", "jsonl"],
  extract: ["json", "jsonl", "csv"]};

function syncTask() {
  const task = $("task").value, format = $("format"), kept = format.value;
  $("question-box").hidden = !(task === "ask" || task === "ground");
  $("fields-box").hidden = task !== "extract";
  format.length = 1;  // the page view stays first
  for (const name of FORMATS[task] || []) format.add(new Option(`${name} (as vl2 ${task} -f ${name})`, name));
  format.value = (FORMATS[task] || []).includes(kept) ? kept : "";
}

// A page on a CPU can take minutes: while one is being read, the status line counts the seconds.
function ticking(prefix) {
  const started = Date.now();
  const show = () => say(`${prefix()} reading for ${Math.round((Date.now() - started) / 1000)} s…`);
  show();
  return setInterval(show, 1000);
}

async function readAs(task, format, body, headers) {
  const timer = ticking(() => `Writing ${format}:`);
  try {
    const response = await fetch(`/v1/documents/${task}`, {method: "POST", body, headers});
    const text = await response.text();
    if (!response.ok) {
      let problem = {};
      try { problem = JSON.parse(text); } catch (_) { /* not JSON: the status says enough */ }
      if (response.status === 401) $("key-row").hidden = false;
      say(`${response.status}: ${(problem.error && problem.error.message) || response.statusText}`, true);
      return;
    }
    const out = document.createElement("article");
    out.className = "page formatted";
    const link = URL.createObjectURL(new Blob([text], {type: response.headers.get("Content-Type") || "text/plain"}));
    const name = `${chosen.name}.${task}.${{markdown: "md", text: "txt", jsonl: "jsonl", docling: "docling.json"}[format] || format}`;
    out.innerHTML = `<h2>${escapeHtml(chosen.name)} · ${escapeHtml(task)} · ${escapeHtml(format)} ` +
      `<a download="${escapeHtml(name)}" href="${link}">download</a></h2><pre>${escapeHtml(text)}</pre>`;
    results.appendChild(out);
    const pages = response.headers.get("X-Vl2-Pages") || "?";
    say(`${pages} of ${pages} pages done.`);
  } finally {
    clearInterval(timer);
  }
}

async function read(event) {
  event.preventDefault();
  if (!chosen) { say("Choose a file first.", true); return; }
  const task = $("task").value, body = new FormData();
  body.append("file", chosen, chosen.name);
  for (const name of ["question", "fields", "pages", "max_tokens"]) {
    const value = $(name).value.trim();
    if (value && !$(name).closest("label").hidden) body.append(name, value);
  }
  const headers = {}, key = $("key").value || sessionStorage.getItem("vl2-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  $("go").disabled = true;
  results.innerHTML = "";
  say("Reading…");
  let timer = null;
  try {
    const format = $("format").value;
    if (format) {
      body.append("format", format);
      await readAs(task, format, body, headers);
      if (key) sessionStorage.setItem("vl2-key", key);
      return;
    }
    const response = await fetch(`/v1/documents/${task}?stream=true`, {method: "POST", body, headers});
    if (!response.ok) {
      const problem = await response.json().catch(() => ({}));
      if (response.status === 401) $("key-row").hidden = false;
      say(`${response.status}: ${(problem.error && problem.error.message) || response.statusText}`, true);
      return;
    }
    if (key) sessionStorage.setItem("vl2-key", key);
    const total = Number(response.headers.get("X-Vl2-Pages") || 0);
    let done = 0, buffer = "";
    const reader = response.body.getReader(), decoder = new TextDecoder();
    timer = ticking(() => `${done} of ${total} pages done;`);
    for (;;) {
      const {value, done: finished} = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), {stream: !finished});
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline); buffer = buffer.slice(newline + 1);
        if (!line.trim()) continue;
        const record = JSON.parse(line);
        if (record.error && !record.task) { clearInterval(timer); say(record.error.message, true); continue; }
        showRecord(record); done++;
        clearInterval(timer);
        if (done < total) timer = ticking(() => `${done} of ${total} pages done;`);
        else say(`${done} of ${total} pages done.`);
      }
      if (finished) break;
    }
  } catch (err) {
    say(`The request failed: ${err}`, true);
  } finally {
    clearInterval(timer);
    $("go").disabled = false;
  }
}

drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
fileInput.addEventListener("change", () => choose(fileInput.files[0]));
$("task").addEventListener("change", syncTask);
form.addEventListener("submit", read);
syncTask();
