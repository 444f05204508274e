// The review pages' only script: keyboard shortcuts and image zoom. Every action is also a
// plain link or form button, so the pages work without it.
(function () {
  "use strict";
  var viewer = document.querySelector(".viewer");

  function zoom() {
    // 1x -> 2x -> 4x -> 1x; the figure scrolls when the image is larger than it
    if (!viewer) return;
    var next = { "1": "2", "2": "4", "4": "1" }[viewer.getAttribute("data-zoom")] || "1";
    viewer.setAttribute("data-zoom", next);
  }
  if (viewer) viewer.addEventListener("click", zoom);

  function press(key) {
    var el = document.querySelector("[data-key='" + key + "']");
    if (el) el.click();
    return !!el;
  }

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    var typing = t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.isContentEditable);
    if (typing) {
      if (t.tagName === "TEXTAREA" && e.key === "Enter" && (e.ctrlKey || e.metaKey) && press("e")) e.preventDefault();
      if (e.key === "Escape") t.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var key = e.key === "ArrowLeft" ? "left" : e.key === "ArrowRight" ? "right" : e.key.toLowerCase();
    if (key === "e") {
      var text = document.querySelector("textarea");
      if (text) { e.preventDefault(); text.focus(); }
    } else if (key === "z") {
      zoom();
    } else if (press(key)) {
      e.preventDefault();
    }
  });
})();
