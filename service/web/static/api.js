// The one way pages reach the service: the /v1 API with the token (asked once, kept in
// sessionStorage), images fetched as blobs (an <img> cannot send the token), and live events
// from /v1/events with polling as the fallback.

const KEY = "aip.token";
let asking = null;

export function token() {
  return sessionStorage.getItem(KEY) || "";
}

function askToken(refused) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-error").hidden = !refused;
  asking = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        sessionStorage.setItem(KEY, input.value.trim());
        asking = null;
        resolve();
      },
      { once: true },
    );
  });
  dialog.showModal();
  input.focus();
  return asking;
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

function headers(extra) {
  const out = new Headers(extra || {});
  if (token()) out.set("Authorization", `Bearer ${token()}`);
  return out;
}

// fetch() with the token; a 401 asks for it (once) and tries again.
export async function request(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.status !== 401) return response;
    await askToken(Boolean(token()));
  }
}

export async function json(path, options = {}) {
  const response = await request(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export function post(path, body) {
  return json(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
}

const blobs = new Map();

// An object URL for an image route, fetched with the token; cached for the page's life.
export async function blobUrl(path) {
  if (!blobs.has(path)) {
    blobs.set(
      path,
      request(path).then(async (response) => {
        if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
        return URL.createObjectURL(await response.blob());
      }).catch((error) => {
        blobs.delete(path); // not kept: a redacted copy still being written, say, comes later
        throw error;
      }),
    );
  }
  return blobs.get(path);
}

export async function download(path, name) {
  const response = await request(path);
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
}

// Upload with per-file progress: XMLHttpRequest reports upload bytes, fetch does not.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    if (token()) xhr.setRequestHeader("Authorization", `Bearer ${token()}`);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {}
      if (xhr.status === 401) {
        askToken(Boolean(token())).then(() => upload(path, form, onProgress).then(resolve, reject));
      } else if (xhr.status >= 400) reject(new ApiError(xhr.status, body));
      else resolve(body);
    };
    xhr.onerror = () => reject(new ApiError(0, { message: "the service could not be reached" }));
    xhr.send(form);
  });
}

export const EVENT_TYPES = [
  "job.created", "job.claimed", "job.stage", "job.text", "job.succeeded", "job.failed",
  "job.cancelled", "job.retrying", "model.progress", "model.loaded", "model.unloaded",
  "inbox.filed", "inbox.rejected", "webhook.delivered", "webhook.failed",
];

function liveBadge(state) {
  const badge = document.getElementById("live");
  if (!badge) return;
  badge.textContent = state;
  badge.dataset.state = state;
}

// Live events: onEvent({type, job_id, data}) for each one from /v1/events. When the stream
// cannot be opened (or drops for good), `poll` runs every `every` ms instead. Returns a stop().
export function live({ jobId = null, onEvent, poll, every = 2000 }) {
  let source = null;
  let timer = null;
  let stopped = false;
  const fallback = () => {
    if (source) source.close();
    source = null;
    liveBadge("polling");
    if (poll && !timer && !stopped) timer = setInterval(poll, every);
  };
  if (typeof EventSource === "undefined") {
    fallback();
  } else {
    const query = new URLSearchParams();
    if (jobId != null) query.set("job_id", jobId);
    if (token()) query.set("token", token());
    source = new EventSource(`/v1/events?${query}`);
    let opened = false;
    source.onopen = () => {
      opened = true;
      liveBadge("live");
      // What changed between the page's first read and the stream opening.
      if (poll) poll();
    };
    source.onerror = () => {
      // Never opened (no route, refused): poll. Opened once: the browser reconnects itself,
      // resuming from the last id; closed for good: poll.
      if (!opened || source.readyState === EventSource.CLOSED) fallback();
      else liveBadge("reconnecting");
    };
    const handle = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (!event || typeof event !== "object") return;
      const type = event.type || message.type;
      onEvent({ type, job_id: event.job_id ?? null, data: event.data || {}, id: event.id });
    };
    source.onmessage = handle;
    for (const type of EVENT_TYPES) source.addEventListener(type, handle);
  }
  return () => {
    stopped = true;
    if (source) source.close();
    if (timer) clearInterval(timer);
  };
}
