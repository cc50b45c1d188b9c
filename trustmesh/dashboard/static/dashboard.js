// Live updates: the server sends one `block` event per committed block (server-sent events);
// a page whose data the block touches re-reads its <main> (same URL, ?partial=1&live=1) and
// swaps it in place. No reload, no framework.
(function () {
  "use strict";
  var watch = document.body.getAttribute("data-watch") || "";
  var live = document.getElementById("live");
  var busy = false, again = false, last = 0;
  var MIN_GAP = watch === "nodes" ? 2000 : 400;  // ms between two re-reads of one page

  function say(text, cls) {
    if (!live) return;
    live.textContent = text;
    live.className = "live " + (cls || "");
  }

  function concerns(message) {
    if (watch === "") return false;
    if (watch === "nodes") return true;  // heartbeats, loads: any block may change them
    var touched = message.workflows || [];
    if (watch === "*") return touched.length > 0;
    return touched.indexOf(watch) >= 0 || touched.indexOf("*") >= 0;
  }

  function partialUrl() {
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    url.searchParams.set("live", "1");
    return url.toString();
  }

  function refresh() {
    if (busy) { again = true; return; }
    var wait = last + MIN_GAP - Date.now();
    if (wait > 0) { busy = true; setTimeout(function () { busy = false; refresh(); }, wait); return; }
    busy = true;
    last = Date.now();
    fetch(partialUrl(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401 || response.redirected) { window.location.reload(); return null; }
        if (!response.ok) { say("chain not readable (" + response.status + ")", "down"); return null; }
        say("live", "up");
        return response.text();
      })
      .then(function (html) {
        if (html === null || html === undefined) return;
        var main = document.getElementById("content");
        if (main) {
          main.innerHTML = html;
          main.setAttribute("data-refreshed", String(Date.now()));
        }
      })
      .catch(function () { say("reconnecting…", "down"); })
      .then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
  }

  function headBlock(number) {
    var head = document.getElementById("head-block");
    if (head && number !== null && number !== undefined) {
      head.textContent = "block " + number;
      head.setAttribute("data-block", String(number));
    }
  }

  if (!window.EventSource) { say("no live updates in this browser", "down"); return; }
  var source = new EventSource("/api/events");
  source.addEventListener("hello", function () { say("live", "up"); });
  source.addEventListener("block", function (event) {
    var message;
    try { message = JSON.parse(event.data); } catch (err) { return; }
    say("live", "up");
    headBlock(message.block);
    if (concerns(message)) refresh();
  });
  source.onerror = function () { say("reconnecting…", "down"); };
  // Heartbeats and pending batches change between blocks too (a stalled chain most of all).
  if (watch === "nodes") setInterval(refresh, 5000);
})();
