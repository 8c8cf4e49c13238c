// The dashboard's only script besides htmx: the API key (kept in this tab's sessionStorage,
// not kept beyond the tab nor in a cookie), the headers every request carries, the message bar,
// and the confirmation of a replay of the selected jobs. Data is rendered by the server and
// escaped there; this file writes text only (textContent).
"use strict";
(function () {
  const KEY = "conveyor.apiKey";

  function message(text, bad) {
    const box = document.getElementById("message");
    const line = document.createElement("span");
    line.className = bad ? "bad" : "ok";
    line.textContent = text;
    box.replaceChildren(line);
  }

  // Request bodies are JSON, as everywhere in the API (a form body is refused with 415);
  // "ids" (the selected jobs' checkboxes) is always a list.
  htmx.defineExtension("json-enc", {
    onEvent: function (name, ev) {
      if (name === "htmx:configRequest") ev.detail.headers["Content-Type"] = "application/json";
    },
    encodeParameters: function (xhr, parameters) {
      xhr.overrideMimeType("text/json");
      const body = {};
      parameters.forEach(function (value, key) {
        if (key === "ids") (body.ids = body.ids || []).push(value);
        else body[key] = value;
      });
      return JSON.stringify(body);
    },
  });

  document.addEventListener("htmx:configRequest", function (ev) {
    // X-Requested-With: the gate's cross-site check when auth is off (a JSON body or this)
    ev.detail.headers["X-Requested-With"] = "conveyor-ui";
    const key = sessionStorage.getItem(KEY);
    if (key) ev.detail.headers["X-API-Key"] = key;
  });

  document.addEventListener("htmx:responseError", function (ev) {
    const xhr = ev.detail.xhr;
    let text = xhr.status + " " + xhr.statusText;
    try {
      const body = JSON.parse(xhr.responseText);
      if (body && body.message) text = xhr.status + ": " + body.message;
    } catch (e) { /* not JSON: keep the status line */ }
    if (xhr.status === 401 || xhr.status === 403) text += " (enter an admin API key above)";
    message(text, true);
  });

  document.addEventListener("htmx:sendError", function () {
    message("the API does not answer", true);
  });

  document.addEventListener("htmx:afterRequest", function (ev) {
    // a read that succeeds again clears an error it left
    const box = document.getElementById("message");
    const verb = ev.detail.requestConfig && ev.detail.requestConfig.verb;
    if (ev.detail.successful && verb === "get" && box.querySelector(".bad")) box.replaceChildren();
  });

  document.addEventListener("htmx:confirm", function (ev) {
    const template = ev.detail.elt.getAttribute("data-confirm-selected");
    if (!template) return;
    ev.preventDefault();
    const n = document.querySelectorAll("#jobs-table input[name=ids]:checked").length;
    if (n === 0) { message("select some jobs first", true); return; }
    if (window.confirm(template.replace("{n}", String(n)))) ev.detail.issueRequest(true);
  });

  document.addEventListener("change", function (ev) {
    if (ev.target.id !== "select-all") return;
    document.querySelectorAll("#jobs-table input[name=ids]").forEach(function (box) {
      box.checked = ev.target.checked;
    });
  });

  function showKeyState() {
    document.getElementById("key-state").textContent =
      sessionStorage.getItem(KEY) ? "key set for this tab" : "no key";
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = document.getElementById("key-form");
    const input = document.getElementById("api-key");
    input.value = sessionStorage.getItem(KEY) || "";
    showKeyState();
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      const value = input.value.trim();
      if (value) sessionStorage.setItem(KEY, value);
      else sessionStorage.removeItem(KEY);
      showKeyState();
      message(value ? "API key set for this tab" : "API key cleared", false);
      htmx.trigger(document.body, "refresh");
    });
  });
})();
