// The longlive web page: a live session (Media Source Extensions on the fragmented MP4 stream, or JPEG
// frames over a WebSocket where MSE is missing), its prompt timeline and readouts, and batch jobs.
// Plain ES module, no build step; served by the Ingress at / (deployments/ingress.py).
//
// 1. API: fetch with the session's bearer token and the optional X-API-Key.
// 2. MP4 boxes: the stream is split into its init segment (ftyp + moov) and one fragment (moof + mdat)
//    per block; the codec string comes from the avcC box, each fragment's first frame from its tfdt
//    (decode times count from the session's start) and its block from the mfhd sequence number.
// 3. Players: MSE (appends fragments to a SourceBuffer, stays near the live edge, skips gaps left by
//    dropped blocks) and JPEG (draws frames on a canvas at 16 FPS).
// 4. The live session: start, prompts, status polling (1/s: the service rate-limits per client),
//    timeline, readouts, download of the video so far, stop.
// 5. Batch jobs: a schedule, submit, progress.

const $ = (id) => document.getElementById(id);
const FPS = 16;
const POLL_MS = 1000;
const TICK_MS = 250;
const MAX_LAG_S = 3; // further behind the live edge than this: jump to it
const LIVE_LAG_S = 1.0; // ... landing this far behind it
const KEEP_BEHIND_S = 30; // media kept in the SourceBuffer behind the playhead
const JPEG_MAX_QUEUE = 2 * FPS; // more JPEG frames waiting than this: drop to the newest
const RETRIES = 5; // stream reconnects (from the next frame) before giving up
const MediaSourceImpl = window.MediaSource || window.ManagedMediaSource;

// -- 1. API -------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function apiKey() {
  return $('api-key').value.trim();
}

function authHeaders(token) {
  const headers = {};
  if (apiKey()) headers['X-API-Key'] = apiKey();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function problem(response) {
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (typeof body.detail === 'string') detail = body.detail;
    else if (Array.isArray(body.detail)) {
      detail = body.detail.map((e) => `${(e.loc || []).slice(1).join('.') || 'body'}: ${e.msg}`).join('; ');
    }
  } catch (_) {
    /* not JSON */
  }
  const retry = response.headers.get('Retry-After');
  if (response.status === 401) detail += ' (set the API key under Settings)';
  if (retry) detail += ` (retry in ${retry} s)`;
  return detail;
}

async function api(path, { method = 'GET', body, token } = {}) {
  const headers = authHeaders(token);
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new ApiError(response.status, await problem(response));
  return response.status === 204 ? null : response.json();
}

function showError(message) {
  const element = $('error');
  element.textContent = message || '';
  element.hidden = !message;
}

function wsUrl(path, params) {
  const url = new URL(path, document.baseURI);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  return url.toString();
}

// -- 2. MP4 boxes ---------------------------------------------------------------------------------------
const u32 = (d, at) => ((d[at] << 24) >>> 0) + (d[at + 1] << 16) + (d[at + 2] << 8) + d[at + 3];
const fourcc = (d, at) => String.fromCharCode(d[at], d[at + 1], d[at + 2], d[at + 3]);

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function* boxes(d, start = 0, end = d.length) {
  for (let at = start; at + 8 <= end; ) {
    const size = u32(d, at);
    if (size < 8 || at + size > end) throw new Error(`malformed MP4 box at byte ${at}`);
    yield { type: fourcc(d, at + 4), at, size };
    at += size;
  }
}

function find(d, name) {
  // The first occurrence of a box type's four letters (the server's fmp4.py does the same).
  const [a, b, c, e] = [...name].map((ch) => ch.charCodeAt(0));
  for (let i = 0; i + 3 < d.length; i++) {
    if (d[i] === a && d[i + 1] === b && d[i + 2] === c && d[i + 3] === e) return i;
  }
  return -1;
}

/** Top-level boxes out of a byte stream that arrives in arbitrary pieces. */
class BoxSplitter {
  constructor() {
    this.pending = new Uint8Array(0);
  }

  push(chunk) {
    let data = this.pending.length ? concat([this.pending, chunk]) : chunk;
    const out = [];
    let at = 0;
    while (data.length - at >= 8) {
      const size = u32(data, at);
      if (size < 8) throw new Error('malformed MP4 stream');
      if (data.length - at < size) break;
      out.push({ type: fourcc(data, at + 4), data: data.subarray(at, at + size) });
      at += size;
    }
    this.pending = data.slice(at);
    return out;
  }
}

function initInfo(init) {
  // avcC: configurationVersion, then profile, compatibility, level -> the MSE codec string.
  const avcc = find(init, 'avcC');
  const hex = (i) => init[avcc + 4 + i].toString(16).padStart(2, '0');
  const mdhd = find(init, 'mdhd'); // version(1) flags(3), then times and the timescale
  const timescale = u32(init, mdhd + (init[mdhd + 4] === 1 ? 24 : 16));
  return { mime: `video/mp4; codecs="avc1.${hex(1)}${hex(2)}${hex(3)}"`, timescale };
}

function fragmentInfo(moof, timescale) {
  const info = { block: null, firstFrame: 0, frames: 0 };
  const walk = (start, end) => {
    for (const box of boxes(moof, start, end)) {
      if (box.type === 'mfhd') info.block = u32(moof, box.at + 12) - 1; // sequence numbers count blocks from 1
      else if (box.type === 'tfdt') {
        const v1 = moof[box.at + 8] === 1;
        const time = v1 ? u32(moof, box.at + 12) * 2 ** 32 + u32(moof, box.at + 16) : u32(moof, box.at + 12);
        info.firstFrame = Math.round((time * FPS) / timescale);
      } else if (box.type === 'trun') info.frames = u32(moof, box.at + 12);
      else if (box.type === 'traf') walk(box.at + 8, box.at + box.size);
    }
  };
  walk(8, moof.length);
  return info;
}

// -- 3. Players -----------------------------------------------------------------------------------------
/** MSE on `GET video.mp4` (fetch, so the token and API key go in headers). */
class MsePlayer {
  constructor(session) {
    this.session = session;
    this.mode = 'mse';
    this.video = $('video');
    this.queue = [];
    this.sourceBuffer = null;
    this.init = null;
    this.timescale = null;
    this.ended = false;
    this.lastShown = 0;
  }

  async start(fromFrame) {
    this.source = new MediaSourceImpl();
    if (window.ManagedMediaSource && this.source instanceof window.ManagedMediaSource) {
      this.video.disableRemotePlayback = true;
    }
    const opened = new Promise((resolve) => this.source.addEventListener('sourceopen', resolve, { once: true }));
    this.video.src = URL.createObjectURL(this.source);
    this.video.hidden = false;
    $('canvas').hidden = true;
    await opened;
    this.read(fromFrame);
  }

  async read(fromFrame) {
    const s = this.session;
    for (let attempt = 0; ; attempt++) {
      this.abort = new AbortController();
      try {
        const url = new URL(`v1/sessions/${s.id}/video.mp4`, document.baseURI);
        url.searchParams.set('from_frame', fromFrame);
        const response = await fetch(url, { headers: authHeaders(s.token), signal: this.abort.signal });
        if (!response.ok) throw new ApiError(response.status, await problem(response));
        const reader = response.body.getReader();
        const splitter = new BoxSplitter();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          for (const box of splitter.push(value)) this.onBox(box);
        }
        break; // the server ended the stream: the session is over
      } catch (err) {
        if (err instanceof FallbackNeeded) {
          this.abort.abort();
          this.onFallback();
          return;
        }
        if (this.abort.signal.aborted || s.stopping) return;
        const gone = err instanceof ApiError && [401, 403, 404].includes(err.status);
        if (gone || attempt >= RETRIES) {
          showError(`video stream: ${err.message}`);
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 1000));
        fromFrame = s.nextFrame; // resume where we are; the server sends no duplicate frames
      }
    }
    this.ended = true;
    this.pump();
  }

  onBox({ type, data }) {
    const s = this.session;
    if (type === 'ftyp' || type === 'moov') {
      if (this.init) return; // a resumed stream repeats the init segment
      this.initParts = [...(this.initParts || []), data.slice()];
      if (type !== 'moov') return;
      this.init = concat(this.initParts);
      const { mime, timescale } = initInfo(this.init);
      this.timescale = timescale;
      s.mime = mime;
      if (!MediaSourceImpl.isTypeSupported(mime)) throw new FallbackNeeded(`${mime} not supported`);
      this.sourceBuffer = this.source.addSourceBuffer(mime);
      this.sourceBuffer.mode = 'segments'; // decode times are session-absolute
      this.sourceBuffer.addEventListener('updateend', () => this.pump());
      s.saved.push(this.init);
      this.append(this.init);
    } else if (type === 'moof') {
      this.moof = data.slice();
    } else if (type === 'mdat' && this.moof) {
      const fragment = concat([this.moof, data]);
      const info = fragmentInfo(this.moof, this.timescale);
      this.moof = null;
      s.saved.push(fragment);
      s.received(info.firstFrame, info.frames, info.block);
      this.append(fragment);
    }
  }

  append(bytes) {
    this.queue.push(bytes);
    this.pump();
  }

  pump() {
    const sb = this.sourceBuffer;
    if (!sb || sb.updating || this.source.readyState !== 'open') return;
    if (this.queue.length) {
      try {
        sb.appendBuffer(this.queue[0]);
        this.queue.shift();
      } catch (err) {
        if (err.name !== 'QuotaExceededError') throw err;
        const t = this.video.currentTime;
        if (sb.buffered.length && t - 2 > sb.buffered.start(0)) sb.remove(0, t - 2);
      }
    } else if (this.ended) {
      this.source.endOfStream();
    }
  }

  /** Every TICK_MS: skip gaps, stay near the live edge, evict played media; returns the readouts. */
  tick() {
    const video = this.video;
    const ranges = video.buffered;
    const out = { lag: null, shown: video.getVideoPlaybackQuality().totalVideoFrames, time: video.currentTime };
    if (!ranges.length) return out;
    const t = video.currentTime;
    const end = ranges.end(ranges.length - 1);
    let inside = false;
    for (let i = 0; i < ranges.length; i++) inside ||= ranges.start(i) <= t + 0.05 && t < ranges.end(i);
    if (!inside) {
      // Before the first fragment (a resumed or late start) or in a gap left by dropped blocks.
      for (let i = 0; i < ranges.length; i++) {
        if (ranges.start(i) > t) {
          video.currentTime = ranges.start(i);
          break;
        }
      }
    } else if (end - t > MAX_LAG_S) {
      video.currentTime = end - LIVE_LAG_S;
    }
    if (video.paused && !video.ended && !this.session.stopping) video.play().catch(() => {});
    const sb = this.sourceBuffer;
    if (sb && !sb.updating && this.source.readyState === 'open' && ranges.start(0) < t - KEEP_BEHIND_S) {
      sb.remove(0, t - KEEP_BEHIND_S / 2);
    }
    out.lag = Math.max(0, end - video.currentTime);
    return out;
  }

  stop() {
    this.abort?.abort();
  }

  download() {
    return { type: 'video/mp4', extension: 'mp4' };
  }
}

class FallbackNeeded extends Error {}

/** JPEG frames over `WS stream?format=jpeg` (a browser cannot send headers: token and key in the query). */
class JpegPlayer {
  constructor(session) {
    this.session = session;
    this.mode = 'jpeg';
    this.canvas = $('canvas');
    this.context = this.canvas.getContext('2d');
    this.queue = [];
    this.shown = 0;
    this.shownFrame = null;
    this.drawing = false;
  }

  async start(fromFrame) {
    $('video').hidden = true;
    this.canvas.hidden = false;
    this.timer = setInterval(() => this.draw(), 1000 / FPS);
    this.connect(fromFrame, 0);
  }

  connect(fromFrame, attempt) {
    const s = this.session;
    const params = { token: s.token, format: 'jpeg', from_frame: fromFrame };
    if (apiKey()) params.api_key = apiKey();
    let frame = fromFrame;
    const ws = new WebSocket(wsUrl(`v1/sessions/${s.id}/stream`, params));
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onmessage = (event) => {
      const bytes = new Uint8Array(event.data);
      s.saved.push(bytes);
      this.queue.push({ frame, bytes });
      s.received(frame, 1, null);
      frame += 1;
    };
    ws.onclose = (event) => {
      if (s.stopping || event.code === 1000) return;
      const refused = { 4401: 'missing or wrong API key', 4403: 'wrong session token', 4404: 'no such session' };
      if (refused[event.code] || attempt >= RETRIES) {
        showError(`video stream: ${refused[event.code] || event.reason || `closed (${event.code})`}`);
        return;
      }
      setTimeout(() => this.connect(s.nextFrame, attempt + 1), 1000);
    };
  }

  async draw() {
    if (this.drawing || !this.queue.length) return;
    if (this.queue.length > JPEG_MAX_QUEUE) this.queue.splice(0, this.queue.length - FPS / 2);
    const { frame, bytes } = this.queue.shift();
    this.drawing = true;
    try {
      const bitmap = await createImageBitmap(new Blob([bytes], { type: 'image/jpeg' }));
      if (this.canvas.width !== bitmap.width || this.canvas.height !== bitmap.height) {
        [this.canvas.width, this.canvas.height] = [bitmap.width, bitmap.height];
      }
      this.context.drawImage(bitmap, 0, 0);
      bitmap.close();
      this.shown += 1;
      this.shownFrame = frame;
    } finally {
      this.drawing = false;
    }
  }

  tick() {
    const time = this.shownFrame === null ? 0 : this.shownFrame / FPS;
    return { lag: this.queue.length / FPS, shown: this.shown, time };
  }

  stop() {
    clearInterval(this.timer);
    this.ws?.close(1000);
  }

  download() {
    return { type: 'video/x-motion-jpeg', extension: 'mjpeg' }; // concatenated JPEGs (ffmpeg -f mjpeg)
  }
}

function mseUsable() {
  return Boolean(MediaSourceImpl) && MediaSourceImpl.isTypeSupported('video/mp4; codecs="avc1.42E01E"');
}

// -- 4. The live session ------------------------------------------------------------------------------
const player = $('player');
let live = null;

function blockStartFrame(block) {
  // From the fragments received (exact); else 1 + 4 * (3 * block - 1), the 3-latent-frame block layout.
  if (live?.blockStarts.has(block)) return live.blockStarts.get(block);
  return block === 0 ? 0 : 12 * block - 3;
}

class LiveSession {
  constructor(created, startedAt) {
    this.id = created.session_id;
    this.token = created.token;
    this.startedAt = startedAt;
    this.saved = []; // every byte received, for the download
    this.nextFrame = 0;
    this.framesReceived = 0;
    this.blockStarts = new Map();
    this.arrivals = []; // [time, frames] for the received-FPS readout
    this.shownHistory = []; // [time, frames shown]
    this.clientPosts = [startedAt]; // performance.now() of each prompt, in the timeline's order
    this.onScreen = new Map(); // timeline index -> seconds from posting to the first frame shown under it
    this.firstFrameS = null;
    this.stopping = false;
    this.status = null;
  }

  received(firstFrame, frames, block) {
    this.nextFrame = firstFrame + frames;
    this.framesReceived += frames;
    if (block !== null) this.blockStarts.set(block, firstFrame);
    this.arrivals.push([performance.now(), frames]);
  }
}

function setState(state) {
  player.dataset.state = state;
  $('r-state').textContent = state;
  const active = state === 'starting' || state === 'live' || state === 'queued';
  $('start').hidden = active;
  $('send').hidden = !active;
  $('send').disabled = state !== 'live' && state !== 'queued';
  $('stop').disabled = !active;
  $('download').disabled = !live || !live.saved.length;
}

async function startSession() {
  showError('');
  const prompt = $('prompt').value.trim();
  if (!prompt) return;
  const body = { prompt, seed: Number($('seed').value || 0) };
  if ($('max-seconds').value) body.max_seconds = Number($('max-seconds').value);
  if (live) endLocally();
  setState('starting');
  const startedAt = performance.now();
  let created;
  try {
    created = await api('v1/sessions', { method: 'POST', body });
  } catch (err) {
    setState('idle');
    showError(`start: ${err.message}`);
    return;
  }
  live = new LiveSession(created, startedAt);
  $('prompt').value = '';
  $('timeline').replaceChildren();
  const jpeg = $('force-jpeg').checked || !mseUsable();
  await play(jpeg ? JpegPlayer : MsePlayer, 0);
  setState('live');
  live.poll = setInterval(pollStatus, POLL_MS);
  live.tick = setInterval(tick, TICK_MS);
  pollStatus();
}

async function play(Player, fromFrame) {
  const session = live;
  session.player = new Player(session);
  // MSE may turn down the stream's codec, known once its init segment is in: go on with JPEG frames.
  session.player.onFallback = () => {
    if (live === session && !session.stopping) play(JpegPlayer, session.nextFrame);
  };
  player.dataset.mode = session.player.mode;
  $('badge').textContent = session.player.mode === 'mse' ? 'MP4 (MSE)' : 'JPEG';
  await session.player.start(fromFrame);
}

function active() {
  return live && !live.stopping && ['starting', 'queued', 'live'].includes(player.dataset.state);
}

async function sendPrompt() {
  showError('');
  const prompt = $('prompt').value.trim();
  if (!prompt || !live) return;
  const postedAt = performance.now();
  try {
    await api(`v1/sessions/${live.id}/prompts`, { method: 'POST', body: { prompt }, token: live.token });
  } catch (err) {
    showError(`prompt: ${err.message}`);
    return;
  }
  live.clientPosts.push(postedAt);
  $('prompt').value = '';
  pollStatus();
}

async function stopSession() {
  if (!live) return;
  const session = live;
  session.stopping = true;
  try {
    await api(`v1/sessions/${session.id}`, { method: 'DELETE', token: session.token });
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) showError(`stop: ${err.message}`);
  }
  endLocally();
}

function endLocally() {
  const session = live;
  session.stopping = true;
  clearInterval(session.poll);
  clearInterval(session.tick);
  session.player?.stop();
  if (session.player instanceof MsePlayer) $('video').pause();
  setState('ended');
}

async function pollStatus() {
  const session = live;
  if (!session || session.polling) return;
  session.polling = true;
  try {
    const status = await api(`v1/sessions/${session.id}`, { token: session.token });
    if (live !== session) return;
    session.status = status;
    renderTimeline(status.prompts);
    $('r-dropped').textContent = String(status.dropped_blocks);
    if (status.state === 'ended' || status.state === 'error') {
      if (status.error) showError(`session: ${status.error}`);
      clearInterval(session.poll);
      if (session.player?.ended !== false || status.state === 'error') setState(status.state);
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 404 && live === session) {
      clearInterval(session.poll); // ended and forgotten
      setState('ended');
    } else if (!(err instanceof ApiError && err.status === 429)) {
      showError(`status: ${err.message}`);
    }
  } finally {
    session.polling = false;
  }
}

function seconds(s) {
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

function renderTimeline(prompts) {
  const list = $('timeline');
  prompts.forEach((entry, i) => {
    let item = list.children[i];
    if (!item) {
      item = document.createElement('li');
      const text = document.createElement('span');
      text.className = 'prompt';
      const meta = document.createElement('span');
      meta.className = 'meta';
      item.append(text, meta);
      list.append(item);
    }
    item.querySelector('.prompt').textContent = entry.prompt;
    let state = 'pending';
    let meta = 'waiting for the next block';
    if (entry.block === -1) {
      state = 'superseded';
      meta = 'superseded before a block was made';
    } else if (entry.block !== null) {
      state = 'applied';
      const at = blockStartFrame(entry.block) / FPS;
      meta = `block ${entry.block} · ${seconds(at)} into the video`;
      if (i > 0 && entry.applied_at !== null) {
        const waited = (Date.parse(entry.applied_at) - Date.parse(entry.posted_at)) / 1000; // ISO 8601 UTC
        meta += ` · applied ${seconds(waited)} after posting`;
      }
      if (live.onScreen.has(i)) meta += ` · on screen after ${seconds(live.onScreen.get(i))}`;
    }
    item.dataset.state = state;
    item.dataset.block = entry.block === null ? '' : String(entry.block);
    item.querySelector('.meta').textContent = meta;
  });
}

function rate(history, now, windowMs = 2000) {
  while (history.length && history[0][0] < now - windowMs) history.shift();
  return history.reduce((n, [, frames]) => n + frames, 0) / (windowMs / 1000);
}

function tick() {
  const session = live;
  if (!session?.player) return;
  const now = performance.now();
  const { lag, shown, time } = session.player.tick();
  // Shown FPS from the player's running count of frames shown.
  const last = session.lastShown ?? shown;
  session.shownHistory.push([now, Math.max(0, shown - last)]);
  session.lastShown = shown;
  if (shown > 0 && session.firstFrameS === null) {
    session.firstFrameS = (now - session.startedAt) / 1000;
    $('r-first').textContent = seconds(session.firstFrameS);
  }
  // Prompt to screen: a prompt is on screen once playback reaches the block it took effect at.
  (session.status?.prompts || []).forEach((entry, i) => {
    if (i === 0 || entry.block === null || entry.block < 0 || session.onScreen.has(i)) return;
    if (session.clientPosts[i] !== undefined && time >= blockStartFrame(entry.block) / FPS) {
      session.onScreen.set(i, (now - session.clientPosts[i]) / 1000);
      $('r-prompt').textContent = seconds(session.onScreen.get(i));
      renderTimeline(session.status.prompts);
    }
  });
  $('r-fps-received').textContent = rate(session.arrivals, now).toFixed(1);
  $('r-fps-shown').textContent = rate(session.shownHistory, now).toFixed(1);
  $('r-lag').textContent = lag === null ? '-' : seconds(lag);
  $('r-frames').textContent = `${session.framesReceived} received, ${shown} shown`;
  player.dataset.framesShown = String(shown);
  player.dataset.time = time.toFixed(3);
  $('download').disabled = !session.saved.length;
  const over = session.player.ended && session.player.queue.length === 0 && !session.stopping;
  if (over && session.status?.state !== 'live' && player.dataset.state !== 'ended') setState('ended');
}

function download() {
  if (!live?.saved.length) return;
  const { type, extension } = live.player.download();
  const url = URL.createObjectURL(new Blob(live.saved, { type }));
  const link = document.createElement('a');
  link.href = url;
  link.download = `longlive-${live.id}.${extension}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// -- 5. Batch jobs --------------------------------------------------------------------------------------
const TERMINAL = new Set(['done', 'failed', 'cancelled']);
let job = null;

function addRow(at = '', prompt = '') {
  const row = document.createElement('tr');
  row.innerHTML =
    '<td><input class="at" type="number" min="0" step="any" required></td>' +
    '<td><input class="text" type="text" maxlength="2000" required></td>' +
    '<td><button type="button" class="remove" aria-label="remove">×</button></td>';
  row.querySelector('.at').value = at;
  row.querySelector('.text').value = prompt;
  row.querySelector('.remove').addEventListener('click', () => {
    if ($('schedule').tBodies[0].rows.length > 1) row.remove();
  });
  $('schedule').tBodies[0].append(row);
}

async function submitJob() {
  showError('');
  const schedule = [...$('schedule').tBodies[0].rows].map((row) => ({
    at: Number(row.querySelector('.at').value),
    prompt: row.querySelector('.text').value.trim(),
  }));
  const body = { schedule, seconds: Number($('job-seconds').value), seed: Number($('job-seed').value || 0) };
  try {
    const created = await api('v1/jobs', { method: 'POST', body });
    followJob({ id: created.job_id, token: created.token });
  } catch (err) {
    showError(`job: ${err.message}`);
  }
}

function followJob(which) {
  clearInterval(job?.poll);
  job = which;
  sessionStorage.setItem('longlive.job', JSON.stringify(which));
  $('job').hidden = false;
  $('job-id').textContent = which.id;
  $('job-result').replaceChildren();
  $('cancel-job').disabled = false;
  job.poll = setInterval(pollJob, POLL_MS);
  pollJob();
}

async function pollJob() {
  const current = job;
  try {
    const status = await api(`v1/jobs/${current.id}`, { token: current.token });
    if (job !== current) return;
    $('job').dataset.state = status.state;
    $('job-state').textContent = status.state;
    $('job-progress').value = status.frames_total ? status.frames_done / status.frames_total : 0;
    let detail = `${status.frames_done} / ${status.frames_total} frames`;
    if (status.fps) detail += ` · ${status.fps.toFixed(1)} FPS`;
    if (status.eta_s !== null) detail += ` · about ${Math.ceil(status.eta_s)} s left`;
    if (status.attempts > 1) detail += ` · attempt ${status.attempts}`;
    if (status.error) detail += ` · ${status.error}`;
    $('job-detail').textContent = detail;
    if (status.result_url) showResult(status.result_url);
    if (TERMINAL.has(status.state)) {
      clearInterval(current.poll);
      $('cancel-job').disabled = true;
    }
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 403)) {
      clearInterval(current.poll);
      sessionStorage.removeItem('longlive.job');
    }
    if (!(err instanceof ApiError && err.status === 429)) showError(`job: ${err.message}`);
  }
}

function showResult(url) {
  const result = $('job-result');
  if (result.childElementCount) return;
  if (/^https?:/.test(url)) {
    const link = document.createElement('a');
    // A local store's video is this service's token-checked route: a link cannot send the header.
    const own = new URL(url, location.href);
    if (own.origin === location.origin) own.searchParams.set('token', job.token);
    link.href = own.href;
    link.textContent = 'Download the video';
    link.rel = 'noopener';
    link.id = 'job-link';
    result.append(link);
  }
}

async function cancelJob() {
  if (!job) return;
  try {
    await api(`v1/jobs/${job.id}`, { method: 'DELETE', token: job.token });
    pollJob();
  } catch (err) {
    showError(`cancel: ${err.message}`);
  }
}

// -- Wiring -----------------------------------------------------------------------------------------------
function showTab(name) {
  for (const tab of document.querySelectorAll('[role=tab]')) {
    const selected = tab.dataset.tab === name;
    tab.setAttribute('aria-selected', String(selected));
    $(tab.dataset.tab).hidden = !selected;
  }
}

for (const tab of document.querySelectorAll('[role=tab]')) {
  tab.addEventListener('click', () => {
    showTab(tab.dataset.tab);
    history.replaceState(null, '', tab.dataset.tab === 'live' ? '#' : `#${tab.dataset.tab}`);
  });
}
if (location.hash === '#batch') showTab('batch');

$('api-key').value = sessionStorage.getItem('longlive.apiKey') || '';
$('api-key').addEventListener('change', () => sessionStorage.setItem('longlive.apiKey', apiKey()));

$('prompt-form').addEventListener('submit', (event) => {
  event.preventDefault();
  if (active()) sendPrompt();
  else startSession();
});
$('prompt').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey) {
    event.preventDefault();
    $('prompt-form').requestSubmit();
  }
});
$('stop').addEventListener('click', stopSession);
$('download').addEventListener('click', download);

$('add-row').addEventListener('click', () => addRow());
$('job-form').addEventListener('submit', (event) => {
  event.preventDefault();
  submitJob();
});
$('cancel-job').addEventListener('click', cancelJob);
addRow(0, '');
addRow(5, '');
const savedJob = sessionStorage.getItem('longlive.job');
if (savedJob) followJob(JSON.parse(savedJob));

window.longlive = { live: () => live, job: () => job }; // for debugging and the browser tests
