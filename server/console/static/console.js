// Secure Key Manager console: confirmation of destructive actions and the key form's type switch.
// Loaded as a file (the Content-Security-Policy allows no inline script).
"use strict";

document.addEventListener("submit", function (ev) {
  var form = ev.target;
  var msg = form.getAttribute && form.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) {
    ev.preventDefault();
  }
}, true);

function showKeyType(form) {
  var checked = form.querySelector("input[name=key_type]:checked");
  var type = checked ? checked.value : "SECRET";
  form.querySelectorAll("[data-for-type]").forEach(function (row) {
    var on = row.getAttribute("data-for-type") === type;
    row.hidden = !on;
    row.querySelectorAll("input, select, textarea").forEach(function (el) { el.disabled = !on; });
  });
  var secret = form.querySelector("#secret-value");
  if (secret) { secret.required = type === "SECRET"; }
}

document.addEventListener("DOMContentLoaded", function () {
  var form = document.getElementById("key-form");
  if (form) {
    showKeyType(form);
    form.querySelectorAll("input[name=key_type]").forEach(function (r) {
      r.addEventListener("change", function () { showKeyType(form); });
    });
  }
});

// Copy buttons: <button data-copy="#id"> copies that element's text.
document.addEventListener("click", function (ev) {
  var btn = ev.target.closest ? ev.target.closest("[data-copy]") : null;
  if (!btn) { return; }
  var src = document.querySelector(btn.getAttribute("data-copy"));
  if (!src) { return; }
  var text = src.textContent;
  var done = function () { btn.textContent = "Copied"; setTimeout(function () { btn.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && navigator.clipboard.writeText) {
    navigator.clipboard.writeText(text).then(done, function () { selectText(src); });
  } else {
    selectText(src);
  }
});

function selectText(el) {
  var range = document.createRange();
  range.selectNodeContents(el);
  var sel = window.getSelection();
  sel.removeAllRanges();
  sel.addRange(range);
}

// The collapsed navigation of narrow windows.
document.addEventListener("DOMContentLoaded", function () {
  var toggle = document.getElementById("nav-toggle");
  var nav = document.getElementById("mainnav");
  if (toggle && nav) {
    toggle.addEventListener("click", function () {
      var open = nav.classList.toggle("open");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
  }
});
