// sdstudio's page script: localization, live progress, Ctrl+Enter, extra-network cards. Loaded in the
// page's <head>.
(() => {
  "use strict";
  let strings = {};
  const SKIP = new Set(["TEXTAREA", "INPUT", "SCRIPT", "STYLE", "CODE", "PRE"]);

  function translateText(node) {
    const raw = node.nodeValue;
    const key = raw.trim();
    if (!key || !(key in strings)) return;
    if (node.parentElement && node.parentElement.closest(".sd-notranslate")) return;  // names, prompts
    const translated = raw.replace(key, strings[key]);
    // Writing a text, even the same one, is a mutation the observer sees: write only real changes.
    if (translated !== raw) node.nodeValue = translated;
  }

  function translateElement(el) {
    for (const attr of ["placeholder", "title", "aria-label"]) {
      const v = el.getAttribute && el.getAttribute(attr);
      if (v && v.trim() in strings && strings[v.trim()] !== v) el.setAttribute(attr, strings[v.trim()]);
    }
  }

  function translateTree(root) {
    if (!root) return;
    if (root.nodeType === Node.TEXT_NODE) {
      if (!root.parentElement || !SKIP.has(root.parentElement.tagName)) translateText(root);
      return;
    }
    if (root.nodeType !== Node.ELEMENT_NODE) return;
    translateElement(root);  // an input's placeholder is translated; its text (the user's) never is
    if (SKIP.has(root.tagName)) return;
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT | NodeFilter.SHOW_ELEMENT);
    let node;
    while ((node = walker.nextNode())) {
      if (node.nodeType === Node.TEXT_NODE) {
        if (!SKIP.has(node.parentElement.tagName)) translateText(node);
      } else {
        translateElement(node);
      }
    }
  }

  async function startLocalization() {
    try {
      const answer = await fetch("/sdstudio/localization.json", { credentials: "same-origin" });
      const data = await answer.json();
      strings = data.strings || {};
      document.documentElement.setAttribute("lang", data.language === "None" ? "en" : data.language.replace("_", "-"));
    } catch (e) {
      strings = {};
    }
    if (!Object.keys(strings).length) return;
    translateTree(document.body);
    new MutationObserver((records) => {
      for (const r of records) {
        if (r.type === "characterData") translateTree(r.target);
        else if (r.type === "attributes") translateElement(r.target);
        else r.addedNodes.forEach(translateTree);
      }
    }).observe(document.body, { childList: true, subtree: true, characterData: true,
                                 attributes: true, attributeFilter: ["placeholder", "title", "aria-label"] });
  }

  // Live progress (sdstudio/ui/progress.py): a generation puts <div class="sd-live" data-job=ID> in its tab's
  // progress area; this polls /sdstudio/progress/ID four times a second and swaps the bar, the textinfo line
  // (training's step and loss) and, at most once per data-period seconds, the preview picture. No gradio
  // update is involved, so the browser's work per update is one small fetch and one element.
  const BAR_PERIOD_MS = 250;
  const FIRST_PREVIEW_POLL_MS = 100;
  async function followJob(area) {
    area.dataset.polling = "1";
    const job = encodeURIComponent(area.dataset.job);
    const period = 1000 * parseFloat(area.dataset.period || "1");
    let html = null, shown = null, shownAt = -Infinity;
    while (area.isConnected) {
      let data;
      try {
        const answer = await fetch(`/sdstudio/progress/${job}`, { credentials: "same-origin", cache: "no-store" });
        if (!answer.ok) return;
        data = await answer.json();
      } catch (e) {
        return;
      }
      if (data.done) return;
      const bar = area.querySelector(".sd-progress");
      if (bar && data.html && data.html !== html) {
        html = data.html;
        bar.outerHTML = html;
      }
      const line = area.querySelector(".sd-live-info");
      if (line && typeof data.info === "string" && line.textContent !== data.info) line.textContent = data.info;
      const box = area.querySelector(".sd-live-preview");
      if (box && data.preview !== null && data.preview !== shown && performance.now() - shownAt >= period) {
        shown = data.preview;
        shownAt = performance.now();
        const img = box.querySelector("img") || box.appendChild(document.createElement("img"));
        img.alt = "";
        img.src = `/sdstudio/progress/${job}/preview?n=${shown}`;
      }
      // from the job's start until its first picture shows, look more often: that picture is what the user
      // waits for (a queued job is polled at the usual pace)
      const waiting = box && shown === null && /data-state="running"/.test(data.html || "");
      await new Promise((resolve) => setTimeout(resolve, waiting ? FIRST_PREVIEW_POLL_MS : BAR_PERIOD_MS));
    }
  }

  new MutationObserver(() => {
    document.querySelectorAll(".sd-live[data-job]:not([data-polling])").forEach(followJob);
  }).observe(document.documentElement, { childList: true, subtree: true });

  // The queue panel (progress.queue_panel): the page's load gives each panel its window's token; while the
  // window has jobs (data-busy="1") this fetches /sdstudio/queue/TOKEN every two seconds, and every six while
  // idle (jobs queued by other events: a model load, Deforum, training), and puts the table in every panel of
  // the page (both tabs show the window's queue) when it changed; a row's ✕ posts that job's cancel. A token
  // the server no longer knows (it restarted) stops the polling.
  const QUEUE_PERIOD_MS = 2000;
  const QUEUE_IDLE_EVERY = 3;
  let queueTicks = 0;
  function showQueue(token, data) {
    const busy = data.busy ? "1" : "0";
    const shown = `${token} ${busy} ${data.html}`;
    document.querySelectorAll(".sd-queue-live").forEach((panel) => {
      if (panel.sdShown === shown) return;  // this element already shows it (a gradio update makes a new one)
      panel.innerHTML = data.html;
      panel.dataset.token = token;
      panel.dataset.busy = busy;
      panel.sdShown = shown;
    });
  }
  async function queueCall(token, path = "", method = "GET") {
    try {
      const answer = await fetch(`/sdstudio/queue/${token}${path}`, { method, credentials: "same-origin",
                                                                       cache: "no-store" });
      if (answer.ok) showQueue(token, await answer.json());
      else if (answer.status === 404) {
        document.querySelectorAll(".sd-queue-live").forEach((panel) => {
          delete panel.dataset.token;
          panel.dataset.busy = "0";
        });
      }
    } catch (e) { /* the server went away for now: the next tick tries again */ }
  }
  setInterval(() => {
    queueTicks += 1;
    const panel = document.querySelector('.sd-queue-live[data-busy="1"][data-token]') ||
      (queueTicks % QUEUE_IDLE_EVERY === 0 && document.querySelector(".sd-queue-live[data-token]"));
    if (panel) queueCall(panel.dataset.token);
  }, QUEUE_PERIOD_MS);
  document.addEventListener("click", (e) => {
    const button = e.target.closest && e.target.closest(".sd-queue-cancel");
    const panel = button && button.closest(".sd-queue-live[data-token]");
    if (panel) queueCall(panel.dataset.token, `/cancel/${encodeURIComponent(button.dataset.job)}`, "POST");
  });

  // Extra-network cards: a click adds the card's prompt text to the tab's prompt (as A1111 does).
  window.sdstudioAddToPrompt = (tab, text) => {
    const area = document.querySelector(`#${tab}_prompt textarea`);
    if (!area) return;
    const current = area.value.trim();
    area.value = current ? (current.endsWith(",") ? `${current} ${text}` : `${current}, ${text}`) : text;
    area.dispatchEvent(new Event("input", { bubbles: true }));
  };

  window.sdstudioFilterCards = (tab, text) => {
    const needle = (text || "").toLowerCase();
    document.querySelectorAll(`#${tab}_extra_networks .sd-card`).forEach((card) => {
      card.style.display = card.dataset.search.includes(needle) ? "" : "none";
    });
  };

  document.addEventListener("keydown", (e) => {
    if (!(e.key === "Enter" && (e.ctrlKey || e.metaKey))) return;
    const box = e.target.closest && e.target.closest("[id$='_prompt'], [id$='_neg_prompt']");
    if (!box) return;
    const tab = box.id.replace(/_(neg_)?prompt$/, "");
    const button = document.getElementById(`${tab}_generate`);
    if (button) { e.preventDefault(); button.click(); }
  });

  document.addEventListener("click", (e) => {
    const card = e.target.closest && e.target.closest(".sd-card");
    if (!card) return;
    if (card.dataset.prompt) window.sdstudioAddToPrompt(card.dataset.tab, card.dataset.prompt);
    if (card.dataset.model) {  // a checkpoint card: ask the page to switch (a hidden box the page listens to)
      const box = document.querySelector("#sd_checkpoint_request textarea");
      if (box) { box.value = card.dataset.model; box.dispatchEvent(new Event("input", { bubbles: true })); }
    }
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startLocalization);
  else startLocalization();
})();
