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
