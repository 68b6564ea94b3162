// immich-usb-backup web UI: the live parts of the pages. Written for this project
// (AGPL-3.0-or-later, as the rest of it); no library, nothing fetched from elsewhere.
// Without it the pages still work: the buttons are forms, the progress is as it was
// when the page was made.
"use strict";

(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const $ = (id) => document.getElementById(id);

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  function duration(s) {
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function setText(id, text) {
    const el = $(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  let wasRunning = null;

  function show(st) {
    const running = st.state === "running";
    const live = $("live");
    if (live) {
      live.dataset.state = st.state;
      const disk = st.disk || (st.job && st.job.disk) || {};
      const kind = (st.job && st.job.kind) || "backup";
      setText("live-headline", running
        ? kind.charAt(0).toUpperCase() + kind.slice(1) + " running on " +
          (disk.label || disk.uuid || "?")
        : "No backup is running");
      $("live-progress").hidden = !running;
      const bar = $("live-bar");
      bar.value = Number(st.percent || 0);
      bar.textContent = bar.value + "%";
      setText("live-phase", st.phase || "-");
      setText("live-detail", st.detail || "-");
      const total = Number(st.bytes_total || 0);
      setText("live-bytes", total ? bytes(Number(st.bytes_done || 0)) + " of " + bytes(total)
        : "-");
      setText("live-rate", st.rate_bps ? bytes(Number(st.rate_bps)) + "/s" : "-");
      setText("live-eta", st.eta_s === null || st.eta_s === undefined ? "-"
        : duration(Number(st.eta_s)));
    }
    document.querySelectorAll("[data-idle-only]").forEach((el) => {
      if (el.tagName === "A") el.setAttribute("aria-disabled", String(running));
      else el.disabled = running;
    });
    // a run that ended: the page's disks, strip and history are new
    if (wasRunning === true && !running) window.location.reload();
    wasRunning = running;
  }

  function listen() {
    if (!window.EventSource || !csrf) return;  // the login page has nothing live
    const events = new EventSource("/api/events");
    events.addEventListener("status", (e) => {
      try { show(JSON.parse(e.data)); } catch (err) { /* a damaged event: wait for the next */ }
    });
  }

  function note(text) {
    let el = $("flash");
    if (!el) {
      el = document.createElement("p");
      el.id = "flash";
      el.className = "card notice";
      el.setAttribute("role", "status");
      const main = document.querySelector("main");
      main.insertBefore(el, main.children[1] || null);
    }
    el.textContent = text;
  }

  // a button's form through the JSON API, so the page stays where it is
  document.querySelectorAll("form[data-api]").forEach((form) => {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = {};
      new FormData(form).forEach((v, k) => { if (k !== "csrf") body[k] = v; });
      form.querySelectorAll("button").forEach((b) => { b.disabled = true; });
      try {
        const r = await fetch(form.dataset.api, {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify(body),
        });
        const answer = await r.json().catch(() => ({}));
        if (r.ok && form.action.endsWith("/action/approve")) {
          window.location.assign("/");
          return;
        }
        note(r.ok ? (answer.started ? "Started." : "Done.") : (answer.message || r.statusText));
        if (answer.running) show(answer.running);
      } catch (err) {
        note("The web UI could not be reached: " + err);
      } finally {
        if (!form.querySelector("[data-idle-only]")) {
          form.querySelectorAll("button").forEach((b) => { b.disabled = false; });
        }
      }
    });
  });

  listen();
})();
