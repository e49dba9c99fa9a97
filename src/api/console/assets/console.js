// stead console: the little the pages need beyond HTML. Everything works
// without it (forms post, links page); it adds auto-refresh and
// "select all". No inline handlers: the content policy runs only this file.
(function () {
  "use strict";
  var REFRESH_KEY = "stead.autoRefresh";

  // The page's rows a user has ticked, or a field they are typing in:
  // a refresh then would lose their work, so it waits.
  function busy(main) {
    if (main.querySelector("input[type=checkbox][name=id]:checked")) return true;
    var active = document.activeElement;
    return !!(active && main.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName));
  }

  function refresh(main) {
    if (document.hidden || busy(main)) return;
    fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" })
      // A redirect (to the login form, when the session ended) is not
      // this page: keep what is shown.
      .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
      .then(function (text) {
        if (!text) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.querySelector("main#main");
        if (fresh && !busy(main)) {
          main.innerHTML = fresh.innerHTML;
          wire(main);
        }
      })
      .catch(function () {});
  }

  function wire(root) {
    var all = root.querySelector("#select-all");
    if (all) {
      all.addEventListener("change", function () {
        root.querySelectorAll("input[type=checkbox][name=id]").forEach(function (box) {
          box.checked = all.checked;
        });
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var main = document.querySelector("main#main");
    if (!main) return;
    wire(main);
    var every = parseInt(main.getAttribute("data-live") || "0", 10);
    var box = document.getElementById("auto-refresh");
    if (!every || !box) return;
    box.checked = localStorage.getItem(REFRESH_KEY) !== "off";
    box.addEventListener("change", function () {
      localStorage.setItem(REFRESH_KEY, box.checked ? "on" : "off");
    });
    setInterval(function () { if (box.checked) refresh(main); }, every * 1000);
  });
})();
