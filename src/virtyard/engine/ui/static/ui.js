// Virtyard web UI: the little behaviour htmx does not give. No framework, no inline script
// (the pages' Content-Security-Policy allows only files from this folder).
(function () {
  "use strict";

  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  // Every htmx request carries the page's CSRF token.
  document.addEventListener("htmx:configRequest", function (evt) {
    evt.detail.headers["X-CSRF-Token"] = csrf();
  });

  // Long operations: say what is going on while the request runs (until its XHR ends,
  // however it ends).
  var pending = [];
  function showBusy() {
    var busy = document.getElementById("busy");
    if (!busy) return;
    busy.hidden = pending.length === 0;
    if (pending.length) busy.querySelector(".busy-text").textContent = pending[pending.length - 1].text;
  }
  document.addEventListener("htmx:beforeSend", function (evt) {
    var elt = evt.detail.elt;
    var text = elt && elt.getAttribute && elt.getAttribute("data-progress");
    var xhr = evt.detail.xhr;
    if (!text || !xhr) return;
    var entry = {xhr: xhr, text: text};
    pending.push(entry);
    showBusy();
    xhr.addEventListener("loadend", function () {
      pending = pending.filter(function (e) { return e !== entry; });
      showBusy();
    });
  });
  // A request that never reached the engine.
  document.addEventListener("htmx:sendError", function () {
    var flash = document.getElementById("flash");
    if (flash) {
      flash.innerHTML = "";
      var div = document.createElement("div");
      div.className = "msg error";
      div.setAttribute("role", "alert");
      div.textContent = "The engine did not answer: check the connection and try again.";
      flash.appendChild(div);
    }
  });

  // Dialogs: loaded into #modal, shown modal (Esc closes), closed when the action answers
  // (its message, success or the engine's error, shows on the page).
  document.addEventListener("htmx:afterSwap", function (evt) {
    var target = evt.detail.target;
    if (target && target.id === "modal") {
      var dialog = target.querySelector("dialog");
      if (dialog && !dialog.open) {
        dialog.showModal();
        var first = dialog.querySelector("select, input, button:not([data-close])");
        if (first) first.focus();
      }
    }
    if (target && target.id === "flash") {
      var open = document.querySelector("#modal dialog[open]");
      if (open) open.close();
    }
  });
  document.addEventListener("click", function (evt) {
    var close = evt.target.closest && evt.target.closest("[data-close]");
    if (close) {
      var dialog = close.closest("dialog");
      if (dialog) dialog.close();
    }
  });

  // Direct LUN: CHAP fields only when asked for.
  document.addEventListener("change", function (evt) {
    var el = evt.target;
    if (el.id === "chap") {
      var box = document.getElementById("chap-fields");
      if (box) box.hidden = !el.checked;
    }
    if (el.name === "lun" && el.type === "radio") {
      var alias = document.getElementById("alias");
      var wwid = el.getAttribute("data-wwid");
      if (alias && (!alias.value || alias.getAttribute("data-auto") === alias.value)) {
        alias.value = wwid;
        alias.setAttribute("data-auto", wwid);
      }
      var chosen = document.getElementById("chosen-lun");
      if (chosen) chosen.textContent = wwid;
    }
    if (el.id === "passthrough") {
      var priv = document.getElementById("privileged");
      if (priv) { priv.disabled = !el.checked; if (!el.checked) priv.checked = false; }
    }
  });

  // LUN table: filter box and sortable columns (client side: the host's list is loaded once).
  function lunRows() {
    var body = document.querySelector("#lun-table tbody");
    return body ? Array.prototype.slice.call(body.querySelectorAll("tr")) : [];
  }
  document.addEventListener("input", function (evt) {
    if (evt.target.id !== "lun-filter") return;
    var words = evt.target.value.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    lunRows().forEach(function (row) {
      var text = row.textContent.toLowerCase();
      var match = words.every(function (w) { return text.indexOf(w) >= 0; });
      row.hidden = !match;
      if (match) shown += 1;
    });
    var count = document.getElementById("lun-count");
    if (count) count.textContent = shown + " of " + lunRows().length + " LUNs shown";
  });
  document.addEventListener("click", function (evt) {
    var button = evt.target.closest && evt.target.closest("button[data-sort]");
    if (!button) return;
    var th = button.closest("th");
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = button.getAttribute("data-sort") === "number";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var rows = lunRows();
    rows.sort(function (a, b) {
      var x = a.children[index].getAttribute("data-value") || a.children[index].textContent;
      var y = b.children[index].getAttribute("data-value") || b.children[index].textContent;
      var cmp = numeric ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
      return ascending ? cmp : -cmp;
    });
    var body = document.querySelector("#lun-table tbody");
    rows.forEach(function (row) { body.appendChild(row); });
  });

  // ISO upload: the disk and the transfer are made through the UI; the browser sends the
  // bytes straight to the transfer's data URL in chunks (a progress step each), then asks to
  // finalize and waits for the engine's verdict (the volume is verified on the host).
  function flashHtml(html) {
    var flash = document.getElementById("flash");
    if (flash) flash.innerHTML = html;  // a message the engine rendered (escaped there)
  }
  function flashError(reason, detail) {
    var flash = document.getElementById("flash");
    if (!flash) return;
    flash.innerHTML = "";
    var div = document.createElement("div");
    div.className = "msg error";
    div.setAttribute("role", "alert");
    var strong = document.createElement("strong");
    strong.className = "reason";
    strong.textContent = reason;
    var span = document.createElement("span");
    span.className = "detail";
    span.textContent = detail;
    div.appendChild(strong);
    div.appendChild(span);
    flash.appendChild(div);
  }
  function post(url, data) {
    return fetch(url, {method: "POST", credentials: "same-origin", body: new URLSearchParams(data),
      headers: {"X-CSRF-Token": csrf(), "HX-Request": "true"}});
  }
  function putChunk(url, blob, offset, last, progress) {
    return new Promise(function (resolve, reject) {
      var xhr = new XMLHttpRequest();
      xhr.open("PUT", url + "?flush=" + (last ? "y" : "n"));
      xhr.setRequestHeader("Content-Range", "bytes " + offset + "-" + (offset + blob.size - 1) + "/*");
      xhr.upload.onprogress = function (e) { progress(offset + e.loaded); };
      xhr.onload = function () {
        if (xhr.status >= 200 && xhr.status < 300) resolve();
        else reject(new Error((xhr.responseText || ("HTTP " + xhr.status)).trim()));
      };
      xhr.onerror = function () { reject(new Error("the connection to the engine failed")); };
      xhr.send(blob);
    });
  }
  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  async function upload(form) {
    var prefix = form.getAttribute("data-prefix");
    var file = form.querySelector("#upload-file").files[0];
    if (!file) return;
    var alias = form.querySelector("#upload-alias").value.trim() || file.name;
    var domain = form.querySelector("#upload-domain").value;
    var button = form.querySelector("#upload-start");
    var box = document.getElementById("upload-progress");
    var bar = document.getElementById("upload-bar");
    var label = document.getElementById("upload-label");
    var percent = document.getElementById("upload-percent");
    function progress(sent) {
      var p = file.size ? Math.floor(100 * sent / file.size) : 100;
      bar.value = p;
      bar.textContent = p + "%";
      percent.textContent = p + "% of " + file.size + " bytes";
    }
    button.disabled = true;
    box.hidden = false;
    label.textContent = "Uploading " + alias + "…";
    progress(0);
    try {
      var started = await post(prefix + "/storage/" + encodeURIComponent(domain) + "/upload",
                               {alias: alias, size: String(file.size)});
      if (started.status === 401) { window.location = started.headers.get("HX-Redirect"); return; }
      if (!started.ok) { flashHtml(await started.text()); return; }
      var info = await started.json();
      try {
        for (var offset = 0; offset < file.size || offset === 0; offset += info.chunk) {
          var end = Math.min(file.size, offset + info.chunk);
          await putChunk(info.url, file.slice(offset, end), offset, end >= file.size, progress);
          if (end >= file.size) break;
        }
      } catch (err) {
        await post(prefix + "/transfers/" + info.transfer + "/end", {cancel: "1"});
        flashError("Upload failed", err.message);
        return;
      }
      progress(file.size);
      label.textContent = "Verifying " + alias + " on the host…";
      var ended = await post(prefix + "/transfers/" + info.transfer + "/end", {});
      if (!ended.ok) { flashHtml(await ended.text()); return; }
      for (;;) {
        var status = await fetch(prefix + "/transfers/" + info.transfer,
                                 {credentials: "same-origin", headers: {"HX-Request": "true"}});
        if (status.status === 202) { await sleep(1000); continue; }
        flashHtml(await status.text());
        break;
      }
    } catch (err) {
      flashError("Upload failed", err.message);
    } finally {
      button.disabled = false;
      box.hidden = true;
      if (window.htmx) window.htmx.trigger(document.body, "upload-done");
    }
  }
  document.addEventListener("submit", function (evt) {
    if (evt.target.id !== "upload-form") return;
    evt.preventDefault();
    upload(evt.target);
  });
})();
