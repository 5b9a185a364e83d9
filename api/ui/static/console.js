// The console's only script: live status. Without it every page works and shows the status
// as of its loading. Each element with data-live-job listens to that job's events
// (/ui/jobs/{id}/events, the API's stream behind the session cookie) and shows each new
// status as text (textContent: nothing from the server is ever parsed as HTML).
"use strict";

// A browser opens about 6 connections per host over HTTP/1.1, and each stream holds one:
// at most this many at once, the others waiting their turn, so links still load.
var MAX_STREAMS = 3;

function watch(cell, next) {
  var source = new EventSource("/ui/jobs/" + encodeURIComponent(cell.dataset.liveJob) + "/events");
  var finished = false;
  function end() {
    if (finished) { return; }
    finished = true;
    source.close();
    next();
  }
  source.addEventListener("status", function (event) {
    var status = JSON.parse(event.data).status;
    cell.textContent = status;
    cell.dataset.status = status;
  });
  source.addEventListener("done", function () {
    var note = document.querySelector(".live-done");
    if (note) { note.hidden = false; }
    end();
  });
  source.onerror = end; // signed out, the job gone, or the server away: stop, do not retry
}

document.addEventListener("DOMContentLoaded", function () {
  var waiting = Array.prototype.slice.call(document.querySelectorAll("[data-live-job]"));
  function startNext() {
    var cell = waiting.shift();
    if (cell) { watch(cell, startNext); }
  }
  for (var i = 0; i < MAX_STREAMS; i++) { startNext(); }
});

// Batches: each element with data-live-batch (a list row, a batch page's progress section)
// polls /ui/batches/{id}/progress, the batch's counts as JSON, and shows them: each
// [data-field] inside gets that field as text, the [data-bar] <progress> its value and max.
// One request at a time for the whole page, then a second's pause, so a page of many
// running batches never floods the server; an element stops once its batch has ended.
var BATCH_POLL_MS = 1000;

function showBatch(box, data) {
  var fields = box.querySelectorAll("[data-field]");
  for (var i = 0; i < fields.length; i++) {
    var value = data[fields[i].dataset.field];
    if (value !== undefined && value !== null) { fields[i].textContent = String(value); }
    if (fields[i].dataset.field === "status") { fields[i].dataset.status = data.status; }
  }
  var bar = box.querySelector("[data-bar]");
  if (bar && data.total > 0) {
    bar.max = data.total;
    bar.value = data.ended;
    bar.textContent = data.percent;
  }
  if (data.final) {
    var note = box.querySelector(".live-done");
    if (note) { note.hidden = false; }
    var open = document.querySelectorAll("[data-while-live]");
    for (var j = 0; j < open.length; j++) { open[j].hidden = true; }
  }
}

function pollBatch(box) {
  var url = "/ui/batches/" + encodeURIComponent(box.dataset.liveBatch) + "/progress";
  // A redirect (signed out) or an error answer ends this element's updates.
  return fetch(url, { credentials: "same-origin", redirect: "error", cache: "no-store" })
    .then(function (response) {
      if (!response.ok) { throw new Error(String(response.status)); }
      return response.json();
    })
    .then(function (data) {
      showBatch(box, data);
      return !data.final;
    })
    .catch(function () { return false; });
}

document.addEventListener("DOMContentLoaded", function () {
  var live = Array.prototype.slice.call(document.querySelectorAll("[data-live-batch]"));
  function round() {
    var still = [];
    var chain = Promise.resolve();
    live.forEach(function (box) {
      chain = chain.then(function () { return pollBatch(box); })
        .then(function (more) { if (more) { still.push(box); } });
    });
    chain.then(function () {
      live = still;
      if (live.length) { setTimeout(round, BATCH_POLL_MS); }
    });
  }
  if (live.length) { setTimeout(round, BATCH_POLL_MS); }
});
