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
