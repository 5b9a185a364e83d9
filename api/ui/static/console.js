// The console's only script: live status. Without it every page works and shows the status
// as of its loading. Each element with data-live-job shows its job's status as it changes, as
// text (textContent: nothing from the server is ever parsed as HTML):
// - on the jobs list, one request for all the page's unfinished rows,
//   /ui/jobs/statuses?id=...&id=... (JSON {id: status}), every 2 s until each has finished;
// - on a job's page (data-live-stream), the job's events (/ui/jobs/{id}/events, the API's
//   stream behind the session cookie); if that stream breaks, polling as the list does, every
//   5 s. Polling stops on any error answer or redirect (signed out).
"use strict";

var LIST_POLL_MS = 2000;
var PAGE_POLL_MS = 5000;
var MAX_IDS = 50; // the most ids /ui/jobs/statuses takes at once
// chatjobs/models.py TERMINAL_STATUSES
var FINAL = ["succeeded", "failed", "cancelled", "expired"];

function isFinal(status) { return FINAL.indexOf(status) >= 0; }

function showStatus(cell, status) {
  if (cell.dataset.status === status) { return; }
  cell.textContent = status;
  cell.dataset.status = status;
}

// Once the job of a page has finished: the note to reload for the result, and no more of
// what only a live job has (the cancel form).
function showEnded() {
  var note = document.querySelector(".live-done");
  if (note) { note.hidden = false; }
  var open = document.querySelectorAll("[data-while-live]");
  for (var j = 0; j < open.length; j++) { open[j].hidden = true; }
}

// The statuses of these cells' jobs, {id: status}: one request per MAX_IDS of them (a page of
// the list is at most 100 rows), one after the other.
function fetchStatuses(cells) {
  var found = {};
  var chain = Promise.resolve();
  for (var i = 0; i < cells.length; i += MAX_IDS) {
    chain = chain.then(askFor(cells.slice(i, i + MAX_IDS), found));
  }
  return chain.then(function () { return found; });
}

function askFor(cells, found) {
  var query = cells.map(function (cell) {
    return "id=" + encodeURIComponent(cell.dataset.liveJob);
  }).join("&");
  return function () {
    return fetch("/ui/jobs/statuses?" + query,
      { credentials: "same-origin", redirect: "error", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error(String(response.status)); }
        return response.json();
      })
      .then(function (part) { Object.assign(found, part); });
  };
}

function pollStatuses(cells, every, onFinal) {
  function round() {
    fetchStatuses(cells)
      .then(function (found) {
        cells = cells.filter(function (cell) {
          var status = found[cell.dataset.liveJob];
          if (typeof status !== "string") { return false; } // gone (retention): stop
          showStatus(cell, status);
          if (isFinal(status)) { onFinal(); return false; }
          return true;
        });
        if (cells.length) { setTimeout(round, every); }
      })
      .catch(function () {}); // signed out (a redirect), or the server away: stop
  }
  if (cells.length) { setTimeout(round, every); }
}

function watch(cell) {
  var source = new EventSource("/ui/jobs/" + encodeURIComponent(cell.dataset.liveJob) + "/events");
  source.addEventListener("status", function (event) {
    var status = JSON.parse(event.data).status;
    showStatus(cell, status);
    if (isFinal(status)) { showEnded(); }
  });
  source.addEventListener("done", function () {
    source.close();
    showEnded();
  });
  // The stream broke (a proxy, a restart) or ended without `done` (signed out, the job
  // gone): EventSource would reconnect for ever, so close it and poll instead, which stops
  // at the first redirect or error.
  source.onerror = function () {
    source.close();
    pollStatuses([cell], PAGE_POLL_MS, showEnded);
  };
}

document.addEventListener("DOMContentLoaded", function () {
  var streamed = document.querySelectorAll("[data-live-job][data-live-stream]");
  for (var i = 0; i < streamed.length; i++) { watch(streamed[i]); }
  var listed = document.querySelectorAll("[data-live-job]:not([data-live-stream])");
  pollStatuses(Array.prototype.slice.call(listed), LIST_POLL_MS, function () {});
});

// Batches: each element with data-live-batch (a list row, a batch page's progress section)
// polls /ui/batches/{id}/progress, the batch's counts as JSON, and shows them: each
// [data-field] inside gets that field as text, the [data-bar] <progress> its value and max.
// One request at a time for the whole page, a second's pause after each, so a page of many
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

function pause(ms) {
  return new Promise(function (resolve) { setTimeout(resolve, ms); });
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
        .then(function (more) {
          if (more) { still.push(box); }
          return pause(BATCH_POLL_MS);
        });
    });
    chain.then(function () {
      live = still;
      if (live.length) { round(); }
    });
  }
  if (live.length) { setTimeout(round, BATCH_POLL_MS); }
});
