// The node's web UI script (served by the node; the CSP allows no inline script).
// - countdowns: every [data-deadline-ms] shows the time left, from the server's clock;
// - live updates: pages marked data-live="reload" reload when the server says a case
//   changed (server-sent events), unless someone is typing in a form there; other
//   pages show a note instead.
(function () {
  "use strict";
  var body = document.body;
  var skew = Number(body.getAttribute("data-server-now-ms")) - Date.now();
  function fmt(ms) {
    var s = Math.floor(Math.abs(ms) / 1000);
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    var two = function (n) { return (n < 10 ? "0" : "") + n; };
    return (h > 0 ? h + ":" + two(m) : m) + ":" + two(r);
  }
  function tick() {
    var now = Date.now() + skew;
    document.querySelectorAll("[data-deadline-ms]").forEach(function (el) {
      var left = Number(el.getAttribute("data-deadline-ms")) - now;
      el.textContent = left >= 0 ? fmt(left) + " left" : "overdue by " + fmt(left);
      el.classList.toggle("overdue", left < 0);
      el.classList.toggle("soon", left >= 0 && left < 5 * 60 * 1000);
    });
  }
  tick();
  setInterval(tick, 1000);

  var dirty = false;
  document.addEventListener("input", function () { dirty = true; });
  if (window.EventSource) {
    var es = new EventSource("/events");
    var pending = null;
    es.addEventListener("case", function () {
      if (pending) return;
      pending = setTimeout(function () {
        pending = null;
        if (body.getAttribute("data-live") === "reload" && !dirty) {
          location.reload();
        } else if (!document.querySelector(".live-note")) {
          var note = document.createElement("div");
          note.className = "live-note";
          note.textContent = "Cases changed; reload to see.";
          body.appendChild(note);
        }
      }, 400);
    });
  }

  // Image viewer: window/level re-renders on the server; zoom and pan in the browser.
  document.querySelectorAll(".image-viewer").forEach(function (v) {
    var img = v.querySelector("img"), form = v.querySelector("form.wl"), stage = v.querySelector(".stage");
    var scale = 1, x = 0, y = 0, drag = null;
    function apply() { img.style.transform = "translate(" + x + "px," + y + "px) scale(" + scale + ")"; img.style.transformOrigin = "0 0"; }
    stage.addEventListener("wheel", function (e) { e.preventDefault(); scale = Math.min(16, Math.max(0.25, scale * (e.deltaY < 0 ? 1.2 : 1 / 1.2))); apply(); });
    stage.addEventListener("mousedown", function (e) { drag = [e.clientX - x, e.clientY - y]; e.preventDefault(); });
    window.addEventListener("mouseup", function () { drag = null; });
    window.addEventListener("mousemove", function (e) { if (drag) { x = e.clientX - drag[0]; y = e.clientY - drag[1]; apply(); } });
    if (form) form.addEventListener("submit", function (e) {
      e.preventDefault();
      var wc = form.querySelector("[name=wc]").value, ww = form.querySelector("[name=ww]").value;
      img.src = img.getAttribute("data-src") + "?wc=" + encodeURIComponent(wc) + "&ww=" + encodeURIComponent(ww);
    });
  });

  // Slide viewer: tiles of the current level; zooming in moves to a finer level
  // (level 0 is full resolution) and past the finest one magnifies; drag pans.
  document.querySelectorAll(".slide-viewer").forEach(function (v) {
    var base = v.getAttribute("data-tiles"), levels = JSON.parse(v.getAttribute("data-levels") || "[]");
    var layer = v.querySelector(".tiles"), level = levels.length - 1, scale = 1, x = 0, y = 0, drag = null;
    function draw() {
      if (level < 0) return;
      var L = levels[level], tw = L[2], th = L[3]; layer.innerHTML = "";
      layer.style.transform = "scale(" + scale + ")";
      var cols = Math.ceil(L[0] / tw), rows = Math.ceil(L[1] / th);
      var w = v.clientWidth / scale, h = v.clientHeight / scale;
      for (var ty = 0; ty < rows; ty++) for (var tx = 0; tx < cols; tx++) {
        var px = tx * tw + x, py = ty * th + y;
        if (px > w || py > h || px + tw < 0 || py + th < 0) continue;
        var img = document.createElement("img");
        img.src = base + "/" + level + "/" + tx + "/" + ty; img.style.left = px + "px"; img.style.top = py + "px";
        layer.appendChild(img);
      }
    }
    v.addEventListener("wheel", function (e) {
      e.preventDefault();
      if (e.deltaY < 0) {
        if (level > 0) { var f = levels[level - 1][0] / levels[level][0]; x *= f; y *= f; level -= 1; }
        else { scale = Math.min(8, scale * 1.25); }
      } else {
        if (scale > 1) { scale = Math.max(1, scale / 1.25); }
        else if (level < levels.length - 1) { var g = levels[level + 1][0] / levels[level][0]; x *= g; y *= g; level += 1; }
      }
      draw();
    });
    v.addEventListener("mousedown", function (e) { drag = [e.clientX / scale - x, e.clientY / scale - y]; e.preventDefault(); });
    window.addEventListener("mouseup", function () { drag = null; });
    window.addEventListener("mousemove", function (e) { if (drag) { x = e.clientX / scale - drag[0]; y = e.clientY / scale - drag[1]; draw(); } });
    draw();
  });
})();
