"""The chat page served at `GET /`: one self-contained HTML file, no external resources.

Upload, drop or paste an image (or paste an image URL / data: URL), ask a question, and the
answer streams in from `POST /v1/chat/completions` with `stream: true`. The conversation is kept
in the page and sent whole each turn (the API is stateless). UI strings exist in English and
Korean (toggle top right; the choice is remembered; default from the browser's language).
Server errors (4xx/5xx JSON, or an error event mid-stream) are shown in the error box.

A server of several models (the settings of a sweep) shows a selector of them (`#model`, its
options rendered into the HTML): each question goes to the selected model and its answer is
labelled with the model's name, so one conversation can compare settings. A model that is still
loading (503 `model_loading`) is retried after the server's Retry-After, a few times.

The page is served with a nonce-based Content-Security-Policy: it may only talk to its own
origin, and model output is inserted with `textContent` (never as HTML). The HTML lives in this
module rather than a package data file so installs from a wheel always carry it.

For tests and scripts: `document.body.dataset.state` is idle | streaming | done | error, the
answer is the last `.msg.assistant .text` (its `.msg` has `data-model`: the model that the
server says answered), and the error box is `#error`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

__all__ = ["render_page"]

_LOAD_RETRIES = 24  # a model loading on demand: 24 tries at the server's Retry-After (5 s)


def render_page(models: str | Sequence[str], *, auth_required: bool, max_image_bytes: int,
                nonce: str) -> str:
    """The page's HTML for this server: the served model name(s) (the first is selected),
    whether to ask for a key, the image size limit."""
    names = [models] if isinstance(models, str) else list(models)
    config = json.dumps({"model": names[0], "models": names, "authRequired": auth_required,
                         "maxImageBytes": max_image_bytes, "loadRetries": _LOAD_RETRIES})
    # "<" escaped so no value can close the <script> element early.
    config = config.replace("<", "\\u003c")
    options = "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>'
                      for n in names)
    return (_PAGE.replace("__NONCE__", nonce).replace("__CONFIG__", config)
            .replace("__OPTIONS__", options)
            .replace("__MODEL_ROW_HIDDEN__", " hidden" if len(names) < 2 else ""))


_STYLE = """
:root { color-scheme: light dark; --accent: #2563eb; --muted: #6b7280; --line: #d1d5db; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans KR",
  "NanumGothic", sans-serif; }
header { display: flex; align-items: center; gap: 12px; padding: 10px 16px;
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 17px; margin: 0; flex: 1; }
main { max-width: 860px; margin: 0 auto; padding: 16px; display: grid; gap: 12px; }
#transcript { display: grid; gap: 10px; }
.msg { border: 1px solid var(--line); border-radius: 10px; padding: 8px 12px; }
.msg.user { background: rgba(37, 99, 235, .07); }
.msg .who { font-size: 12px; color: var(--muted); }
.msg img { max-width: 200px; max-height: 160px; display: block; margin: 6px 0;
  border-radius: 6px; }
.msg .text { white-space: pre-wrap; word-break: break-word; }
.msg.empty .text { color: var(--muted); font-style: italic; }
form { display: grid; gap: 8px; border: 1px solid var(--line); border-radius: 10px;
  padding: 12px; }
label { font-size: 13px; color: var(--muted); }
.row { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
#drop { border: 1px dashed var(--line); border-radius: 8px; padding: 8px; }
#drop.over { border-color: var(--accent); }
#image-preview { max-width: 240px; max-height: 180px; border-radius: 6px; }
input[type=text], input[type=password], textarea { width: 100%; font: inherit; padding: 6px 8px;
  border: 1px solid var(--line); border-radius: 6px; background: transparent; color: inherit; }
textarea { min-height: 64px; resize: vertical; }
button { font: inherit; padding: 6px 14px; border-radius: 6px; border: 1px solid var(--line);
  background: transparent; color: inherit; cursor: pointer; }
button.primary { background: var(--accent); border-color: var(--accent); color: white; }
button:disabled { opacity: .5; cursor: default; }
#error { color: #b91c1c; background: rgba(185, 28, 28, .08); border-radius: 6px;
  padding: 8px 12px; white-space: pre-wrap; }
.msg .who.inline { display: inline; }
#status, .hint, .model-tag { color: var(--muted); font-size: 13px; }
select { font: inherit; padding: 4px 8px; border: 1px solid var(--line); border-radius: 6px;
  background: transparent; color: inherit; }
"""

_SCRIPT = r"""
"use strict";
const cfg = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
const I18N = {
  en: {
    title: "Chat with {model}", apiKey: "API key", image: "Image (optional)",
    urlPlaceholder: "…or paste an image URL or data: URL",
    pasteHint: "Tip: drop an image here, or paste one with Ctrl+V.",
    removeImage: "Remove image", question: "Question",
    questionPlaceholder: "Ask about the image… (Enter sends, Shift+Enter for a new line)",
    send: "Send", stop: "Stop", newChat: "New chat", you: "You", assistant: "Assistant",
    model: "Setting (model)", loading: "{model} is loading; retrying…",
    generating: "Generating…", done: "Done", emptyAnswer: "(empty answer)",
    emptyQuestion: "Type a question first.", notImage: "That file is not an image.",
    tooLarge: "The image is larger than the server's limit of {n} MB.",
    readFailed: "The image could not be read.",
    network: "Could not reach the server: {message}",
    unauthorized: "The server needs a valid API key ({status}): {message}",
    server: "The server answered {status}: {message}",
  },
  ko: {
    title: "{model}와(과) 대화", apiKey: "API 키", image: "이미지 (선택)",
    urlPlaceholder: "…또는 이미지 URL이나 data: URL 붙여넣기",
    pasteHint: "팁: 이미지를 여기로 끌어오거나 Ctrl+V로 붙여넣을 수 있습니다.",
    removeImage: "이미지 제거", question: "질문",
    questionPlaceholder: "이미지에 대해 질문하세요… (Enter: 보내기, Shift+Enter: 줄바꿈)",
    send: "보내기", stop: "중지", newChat: "새 대화", you: "나", assistant: "어시스턴트",
    model: "설정 (모델)", loading: "{model} 로딩 중… 다시 시도합니다",
    generating: "생성 중…", done: "완료", emptyAnswer: "(빈 답변)",
    emptyQuestion: "먼저 질문을 입력하세요.", notImage: "이미지 파일이 아닙니다.",
    tooLarge: "이미지가 서버 제한({n}MB)보다 큽니다.",
    readFailed: "이미지를 읽을 수 없습니다.",
    network: "서버에 연결할 수 없습니다: {message}",
    unauthorized: "유효한 API 키가 필요합니다 ({status}): {message}",
    server: "서버 응답 {status}: {message}",
  },
};

function stored(key, value) {
  try {
    if (value === undefined) return localStorage.getItem(key);
    localStorage.setItem(key, value);
  } catch (e) { /* storage disabled: the choice lasts for this page only */ }
  return null;
}

let lang = stored("mmjobs.lang") ||
  ((navigator.language || "").toLowerCase().startsWith("ko") ? "ko" : "en");
let history = [];        // OpenAI messages sent so far (the API is stateless)
let imageUrl = null;     // data: URL (or http URL) of the image for the next question
let controller = null;   // AbortController of the running request
let shownError = null;   // {key, vars}, re-rendered when the language changes

function t(key, vars) {
  let text = (I18N[lang] && I18N[lang][key]) || I18N.en[key] || key;
  for (const [k, v] of Object.entries(vars || {})) text = text.split("{" + k + "}").join(v);
  return text;
}

function currentModel() { return $("model").value || cfg.model; }

function applyLang() {
  document.documentElement.lang = lang;
  document.title = t("title", {model: currentModel()});
  for (const el of document.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n, {model: el.dataset.model || currentModel()});
  }
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  $("lang-toggle").textContent = lang === "ko" ? "English" : "한국어";
  renderError();
}

function showError(key, vars) { shownError = {key, vars}; renderError(); }
function clearError() { shownError = null; renderError(); }
function renderError() {
  $("error").hidden = !shownError;
  $("error").textContent = shownError ? t(shownError.key, shownError.vars) : "";
}

function setState(state) {
  document.body.dataset.state = state;
  const busy = state === "streaming";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("status").dataset.i18n = busy ? "generating" : (state === "done" ? "done" : "");
  $("status").textContent = $("status").dataset.i18n ? t($("status").dataset.i18n) : "";
}

function setImage(url) {
  imageUrl = url || null;
  // Only inline images preview: the page's CSP loads no remote images.
  const inline = !!imageUrl && imageUrl.startsWith("data:image/");
  $("image-preview").hidden = !inline;
  if (inline) $("image-preview").src = imageUrl; else $("image-preview").removeAttribute("src");
  $("clear-image").hidden = !imageUrl;
}

function readImageFile(file) {
  if (!file || !file.type.startsWith("image/")) return showError("notImage");
  if (file.size > cfg.maxImageBytes) {
    return showError("tooLarge", {n: (cfg.maxImageBytes / 1048576).toFixed(1)});
  }
  const reader = new FileReader();
  reader.onload = () => { setImage(reader.result); $("image-url").value = ""; clearError(); };
  reader.onerror = () => showError("readFailed");
  reader.readAsDataURL(file);
}

function addMessage(role, text, image, model) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.dataset.i18n = role === "user" ? "you" : "assistant";
  who.textContent = t(who.dataset.i18n);
  box.append(who);
  if (model && cfg.models.length > 1) {  // which setting answered
    const tag = document.createElement("span");
    tag.className = "model-tag";
    tag.textContent = " · " + model;
    who.after(tag);
    who.classList.add("inline");
  }
  if (image && image.startsWith("data:image/")) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "";
    box.append(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(body);
  $("transcript").append(box);
  box.scrollIntoView({block: "end"});
  return box;
}

function failure(status, message) { return {status, message}; }

async function readStream(response, onDelta, onModel) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw failure(500, payload.error.message);
        if (payload.model) onModel(payload.model);
        const delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
        if (delta && delta.content) onDelta(delta.content);
      }
    }
  }
}

async function send() {
  const question = $("question").value.trim();
  if (!question) return showError("emptyQuestion");
  clearError();
  const content = [];
  if (imageUrl) content.push({type: "image_url", image_url: {url: imageUrl}});
  content.push({type: "text", text: question});
  const userMessage = {role: "user", content};
  const model = currentModel();
  const userBox = addMessage("user", question, imageUrl);
  const answerBox = addMessage("assistant", "", null, model);
  const answerText = answerBox.querySelector(".text");
  let answer = "";
  setState("streaming");
  const headers = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  controller = new AbortController();
  try {
    const body = JSON.stringify({model, messages: [...history, userMessage], stream: true});
    let response;
    for (let attempt = 0; ; attempt++) {
      response = await fetch("v1/chat/completions", {
        method: "POST", headers, signal: controller.signal, body,
      });
      // A model loading on demand: wait as the server asks, then ask again.
      if (response.status !== 503 || attempt >= cfg.loadRetries) break;
      let code = null;
      try { code = (await response.clone().json()).error.code; } catch (e) { /* not JSON */ }
      if (code !== "model_loading") break;
      answerText.textContent = t("loading", {model});
      const wait = Number(response.headers.get("Retry-After")) || 5;
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      answerText.textContent = "";
    }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw failure(response.status, message);
    }
    await readStream(response, (delta) => {
      answer += delta;
      answerText.textContent = answer;
    }, (answeredBy) => { answerBox.dataset.model = answeredBy; });
    finishAnswer(userMessage, answerBox, answer);
  } catch (e) {
    if (e && e.name === "AbortError") {
      finishAnswer(userMessage, answerBox, answer);
    } else {
      userBox.remove();
      answerBox.remove();
      if (e && e.status === 401) showError("unauthorized", e);
      else if (e && e.status) showError("server", e);
      else showError("network", {message: String(e && e.message || e)});
      setState("error");
    }
  } finally {
    controller = null;
  }
}

function finishAnswer(userMessage, answerBox, answer) {
  if (!answer) {
    answerBox.classList.add("empty");
    answerBox.querySelector(".text").dataset.i18n = "emptyAnswer";
    answerBox.querySelector(".text").textContent = t("emptyAnswer");
  }
  history.push(userMessage, {role: "assistant", content: answer});
  $("question").value = "";
  setImage(null);
  $("image-file").value = "";
  setState("done");
}

$("chat").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("transcript").replaceChildren();
  clearError();
  setState("idle");
});
$("image-file").addEventListener("change", () => readImageFile($("image-file").files[0]));
$("image-url").addEventListener("input", () => setImage($("image-url").value.trim()));
$("clear-image").addEventListener("click", () => {
  setImage(null);
  $("image-url").value = "";
  $("image-file").value = "";
});
document.addEventListener("paste", (e) => {
  const items = (e.clipboardData && e.clipboardData.items) || [];
  for (const item of items) {
    if (item.kind === "file" && item.type.startsWith("image/")) {
      e.preventDefault();
      return readImageFile(item.getAsFile());
    }
  }
});
$("drop").addEventListener("dragover", (e) => {
  e.preventDefault();
  $("drop").classList.add("over");
});
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  readImageFile(e.dataTransfer.files[0]);
});
$("model").addEventListener("change", () => {
  stored("mmjobs.model", $("model").value);
  applyLang();
});
const remembered = stored("mmjobs.model");
if (remembered && cfg.models.includes(remembered)) $("model").value = remembered;
$("lang-toggle").addEventListener("click", () => {
  lang = lang === "ko" ? "en" : "ko";
  stored("mmjobs.lang", lang);
  applyLang();
});
$("auth-row").hidden = !cfg.authRequired;
applyLang();
setState("idle");
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmjobs chat</title>
<style nonce="__NONCE__">""" + _STYLE + """</style>
</head>
<body data-state="loading">
<header>
  <h1 data-i18n="title"></h1>
  <button type="button" id="new-chat" data-i18n="newChat"></button>
  <button type="button" id="lang-toggle" aria-label="Language / 언어"></button>
</header>
<main>
  <div class="row" id="model-row"__MODEL_ROW_HIDDEN__>
    <label for="model" data-i18n="model"></label>
    <select id="model">__OPTIONS__</select>
  </div>
  <div id="transcript" aria-live="polite"></div>
  <div id="error" role="alert" hidden></div>
  <form id="chat" autocomplete="off">
    <div id="auth-row" hidden>
      <label for="api-key" data-i18n="apiKey"></label>
      <input type="password" id="api-key" autocomplete="off">
    </div>
    <div id="drop">
      <label for="image-file" data-i18n="image"></label>
      <div class="row">
        <input type="file" id="image-file"
               accept="image/png,image/jpeg,image/gif,image/webp,image/bmp">
        <button type="button" id="clear-image" data-i18n="removeImage" hidden></button>
      </div>
      <input type="text" id="image-url" data-i18n-placeholder="urlPlaceholder">
      <img id="image-preview" alt="" hidden>
      <div class="hint" data-i18n="pasteHint"></div>
    </div>
    <label for="question" data-i18n="question"></label>
    <textarea id="question" data-i18n-placeholder="questionPlaceholder"></textarea>
    <div class="row">
      <button type="submit" id="send" class="primary" data-i18n="send"></button>
      <button type="button" id="stop" data-i18n="stop" hidden></button>
      <span id="status" aria-live="polite"></span>
    </div>
  </form>
</main>
<script id="config" type="application/json">__CONFIG__</script>
<script nonce="__NONCE__">""" + _SCRIPT + """</script>
</body>
</html>
"""
