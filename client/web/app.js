// Browser demo of the Step-Audio realtime server: plain JavaScript, no build step.
//
// The microphone goes through an AudioWorklet (audio-worklet.js) as pcm16 24 kHz, sent with
// input_audio_buffer.append; replies play through a second worklet that counts what was really
// played, so that when the server says speech_started while the bot talks, the queue is dropped
// at once and conversation.item.truncate carries the milliseconds the user actually heard
// (docs/protocol.md, "Barge-in"). `window.stepaudio` exposes counters for tests and curious users.
"use strict";

const WIRE_RATE = 24000;
const CHUNK_MS = 40;
const TEXT_LIMIT = 400; // characters of a transcript shown (the tiny models babble at length)
const SETTINGS_KEY = "stepaudio-demo-settings";

const $ = (id) => document.getElementById(id);

const stats = {
  appendsSent: 0, msSent: 0, audioDeltas: 0, samplesReceived: 0, playedSamples: 0,
  nonSilentPlayed: 0, analyserNonSilent: 0, bargeIns: 0, truncatesSent: 0, flushes: 0,
  droppedSamples: 0, truncates: [], truncated: [],
  replies: 0, completed: 0, latencies: [], serverLatencies: [], errors: [],
};
const app = (window.stepaudio = {
  state: "disconnected", profile: null, connected: false, stats, events: [],
  transcripts: { user: [], bot: [] },
});

let ws = null;
let ctx = null;
let micStream = null;
let capture = null;
let player = null;
let analyser = null;
let levelTimer = null;
let sendMarks = []; // [ms of input audio sent, performance.now()] for mapping the input clock
let endOfSpeech = null; // performance.now() of the user's last speech sample
let playingItem = null; // assistant item whose audio is queued or playing
const flushedItems = new Set(); // items cut by a barge-in: late deltas are dropped
const responses = new Map(); // response id → {item, bubble, firstAudio, end, text}
const bubbles = new Map(); // item id → bubble element

// -- small helpers ------------------------------------------------------------------------------

function b64FromBytes(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

function floatsFromB64(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

function clip(text) {
  return text.length > TEXT_LIMIT ? text.slice(0, TEXT_LIMIT) + " …" : text;
}

function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function ms(x) { return x == null ? "–" : String(Math.round(x)); }

function logEvent(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

function showProblem(text) {
  const el = $("problem");
  el.textContent = text;
  el.hidden = !text;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

// -- settings -----------------------------------------------------------------------------------

function readSettings() {
  try { return JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch { return {}; }
}

function loadSettingsForm() {
  const saved = readSettings();
  const form = $("settings");
  for (const [k, v] of Object.entries(saved)) {
    const el = form.elements[k];
    if (!el) continue;
    if (el.type === "checkbox") el.checked = !!v; else el.value = v;
  }
  $("thr-out").textContent = form.elements.threshold.value;
}

function formSettings() {
  const f = $("settings").elements;
  return {
    voice: f.voice.value.trim(), instruction: f.instruction.value.trim(),
    instructions: f.instructions.value, threshold: f.threshold.value,
    silence_duration_ms: f.silence_duration_ms.value, pause_ms: f.pause_ms.value,
    min_barge_in_ms: f.min_barge_in_ms.value, max_output_tokens: f.max_output_tokens.value,
    speculative: f.speculative.checked, api_key: f.api_key.value,
  };
}

// Show the server's effective settings in the form, except those the user saved.
function fillFromServer(session) {
  const saved = readSettings();
  const f = $("settings").elements;
  const audio = session.audio || {};
  const td = (audio.input && audio.input.turn_detection) || session.turn_detection || {};
  const extra = session.stepaudio || {};
  const voice = (audio.output && audio.output.voice) || session.voice;
  const put = (name, value) => {
    if (value == null || name in saved) return;
    if (f[name].type === "checkbox") f[name].checked = !!value; else f[name].value = value;
  };
  put("voice", voice);
  put("threshold", td.threshold);
  put("silence_duration_ms", td.silence_duration_ms);
  put("pause_ms", extra.pause_ms);
  put("min_barge_in_ms", extra.min_barge_in_ms);
  put("speculative", extra.speculative);
  put("instruction", extra.instruction);
  $("thr-out").textContent = f.threshold.value;
}

// A GA session.update with the fields the user set (empty fields keep the server's default).
function sessionUpdate(s) {
  const session = { type: "realtime", stepaudio: { speculative: s.speculative } };
  if (s.instructions.trim()) session.instructions = s.instructions;
  const td = {};
  if (s.threshold) td.threshold = Number(s.threshold);
  if (s.silence_duration_ms) td.silence_duration_ms = Number(s.silence_duration_ms);
  session.audio = { input: { turn_detection: td } };
  if (s.voice) session.audio.output = { voice: s.voice };
  if (s.instruction) session.stepaudio.instruction = s.instruction;
  if (s.pause_ms) session.stepaudio.pause_ms = Number(s.pause_ms);
  if (s.min_barge_in_ms) session.stepaudio.min_barge_in_ms = Number(s.min_barge_in_ms);
  if (s.max_output_tokens) session.max_output_tokens = Number(s.max_output_tokens);
  return { type: "session.update", session };
}

// -- audio --------------------------------------------------------------------------------------

async function startAudio() {
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  let source;
  try {
    ctx = new AudioContext({ sampleRate: WIRE_RATE, latencyHint: "interactive" });
    await ctx.audioWorklet.addModule("audio-worklet.js");
    source = ctx.createMediaStreamSource(micStream);
  } catch (err) {
    // Firefox cannot connect a microphone to a context of another rate: run at the device's
    // rate and let the worklets resample.
    if (ctx) await ctx.close();
    ctx = new AudioContext({ latencyHint: "interactive" });
    await ctx.audioWorklet.addModule("audio-worklet.js");
    source = ctx.createMediaStreamSource(micStream);
  }
  capture = new AudioWorkletNode(ctx, "stepaudio-capture", {
    numberOfInputs: 1, numberOfOutputs: 0, processorOptions: { chunkMs: CHUNK_MS },
  });
  capture.port.onmessage = (e) => onCapture(e.data);
  source.connect(capture);

  player = new AudioWorkletNode(ctx, "stepaudio-player", { numberOfInputs: 0, outputChannelCount: [1] });
  player.port.onmessage = (e) => onPlayer(e.data);
  analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  player.connect(analyser);
  analyser.connect(ctx.destination);
  await ctx.resume();

  const buf = new Float32Array(analyser.fftSize);
  levelTimer = setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let peak = 0;
    let sumSq = 0;
    for (let i = 0; i < buf.length; i++) {
      peak = Math.max(peak, Math.abs(buf[i]));
      sumSq += buf[i] * buf[i];
    }
    if (peak > 1e-3) stats.analyserNonSilent++;
    $("bot-level").style.width = levelPercent(Math.sqrt(sumSq / buf.length));
  }, 50);
}

function stopAudio() {
  clearInterval(levelTimer);
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ctx = micStream = capture = player = analyser = null;
}

function onCapture(msg) {
  if (msg.type !== "chunk") return;
  const bytes = new Uint8Array(msg.pcm.buffer);
  send({ type: "input_audio_buffer.append", audio: b64FromBytes(bytes) });
  stats.appendsSent++;
  stats.msSent += (msg.pcm.length * 1000) / WIRE_RATE;
  sendMarks.push([stats.msSent, performance.now()]);
  if (sendMarks.length > 3000) sendMarks.splice(0, 1000);
  $("mic-level").style.width = levelPercent(msg.rms);
}

function onPlayer(msg) {
  if (msg.type === "stats") {
    stats.nonSilentPlayed = msg.nonSilent;
    stats.playedSamples = msg.total;
  } else if (msg.type === "idle") {
    if (playingItem === msg.item) playingItem = null;
  } else if (msg.type === "flushed") {
    stats.flushes++;
    stats.droppedSamples += msg.dropped;
    if (msg.item) {
      const audioEndMs = Math.floor((msg.played * 1000) / WIRE_RATE);
      send({ type: "conversation.item.truncate", item_id: msg.item, content_index: 0,
        audio_end_ms: audioEndMs });
      stats.truncatesSent++;
      stats.truncates.push({ item: msg.item, audio_end_ms: audioEndMs });
      const b = bubbles.get(msg.item);
      if (b) note(b, `interrupted: heard ${audioEndMs} ms`);
      logEvent(`→ truncate ${msg.item} at ${audioEndMs} ms (played)`);
    }
  }
}

// A level meter's width: -60..0 dBFS RMS over the full bar.
function levelPercent(rms) {
  const db = 20 * Math.log10(Math.max(rms, 1e-5));
  return `${Math.max(0, Math.min(100, (db + 60) * (100 / 60)))}%`;
}

// The sample at `clockMs` of the input-audio clock: when was it spoken?
function wallAt(clockMs) {
  for (const [end, t] of sendMarks) if (end >= clockMs) return t - (end - clockMs);
  return performance.now();
}

// -- the conversation view ------------------------------------------------------------------------

function bubble(kind, id, who) {
  const hint = document.querySelector("#transcript .hint");
  if (hint) hint.remove();
  const el = document.createElement("div");
  el.className = `msg ${kind}`;
  el.innerHTML = `<div class="who"><span></span><span class="lat"></span></div><div class="text"></div><div class="note"></div>`;
  el.querySelector(".who span").textContent = who;
  $("transcript").append(el);
  el.scrollIntoView({ block: "end" });
  if (id) bubbles.set(id, el);
  return el;
}

function setText(el, text) { el.querySelector(".text").textContent = clip(text); }
function note(el, text) { el.querySelector(".note").textContent = text; el.classList.add("cut"); }

function setState(state, previous, reason, atMs) {
  app.state = state;
  for (const s of document.querySelectorAll("#states span")) {
    s.classList.toggle("active", s.dataset.state === state);
  }
  const li = document.createElement("li");
  li.textContent = `${atMs != null ? (atMs / 1000).toFixed(2) + " s " : ""}${previous} → ${state} (${reason})`;
  $("state-log").prepend(li);
  while ($("state-log").children.length > 40) $("state-log").lastChild.remove();
}

function updateLatency() {
  const last = stats.latencies[stats.latencies.length - 1];
  $("lat-last").textContent = ms(last);
  $("lat-median").textContent = ms(median(stats.latencies));
  $("lat-server").textContent = ms(stats.serverLatencies[stats.serverLatencies.length - 1]);
  $("turns").textContent = String(stats.replies);
  $("barge-ins").textContent = String(stats.bargeIns);
}

// -- server events --------------------------------------------------------------------------------

const GA = {
  "response.audio.delta": "response.output_audio.delta",
  "response.audio.done": "response.output_audio.done",
  "response.audio_transcript.delta": "response.output_audio_transcript.delta",
  "response.audio_transcript.done": "response.output_audio_transcript.done",
  "response.text.delta": "response.output_text.delta",
  "conversation.item.created": "conversation.item.added",
};

const handlers = {
  "session.created"(e) {
    logEvent(`session ${e.session && e.session.id}`);
    fillFromServer(e.session || {});
    // Settings saved with Apply are sent at once; otherwise the server's defaults stand.
    if (Object.keys(readSettings()).length) send(sessionUpdate(formSettings()));
  },
  "session.updated"() { $("settings-status").textContent = "applied"; },
  "stepaudio.profile"(e) {
    app.profile = e.profile;
    const n = $("notice");
    if (e.profile === "tiny") {
      n.innerHTML = "<b>Tiny test models.</b> This server runs the tiny random-weight checkpoints: " +
        "the replies are <b>babble, and that is expected</b>. Turn-taking, speculation, " +
        "barge-in and streaming are the real machinery.";
      n.hidden = false;
    } else if (e.note) {
      n.textContent = e.note;
      n.hidden = false;
    }
  },
  "stepaudio.state"(e) { setState(e.state, e.previous, e.reason, e.at_ms); },
  "input_audio_buffer.speech_started"(e) {
    // Barge-in: stop the reply's playback now; the worklet answers "flushed" with what was
    // played, and that becomes the truncate.
    if (playingItem && player) {
      flushedItems.add(playingItem);
      player.port.postMessage({ type: "flush" });
      stats.bargeIns++;
      playingItem = null;
      updateLatency();
    }
    if (e.item_id && !bubbles.has(e.item_id)) setText(bubble("user", e.item_id, "you"), "…");
  },
  "input_audio_buffer.speech_stopped"(e) {
    if (typeof e.audio_end_ms === "number") endOfSpeech = wallAt(e.audio_end_ms);
  },
  "conversation.item.input_audio_transcription.completed"(e) {
    const el = bubbles.get(e.item_id) || bubble("user", e.item_id, "you");
    setText(el, e.transcript || "(nothing recognised)");
    app.transcripts.user.push(e.transcript || "");
  },
  "response.created"(e) {
    responses.set(e.response.id, { end: endOfSpeech, firstAudio: null, text: "", item: null });
    endOfSpeech = null;
  },
  "response.output_item.added"(e) {
    const r = responses.get(e.response_id);
    if (r && e.item) {
      r.item = e.item.id;
      r.bubble = bubble("bot", e.item.id, "bot");
    }
  },
  "response.output_audio_transcript.delta"(e) {
    const r = responses.get(e.response_id);
    if (!r) return;
    r.text += e.delta;
    if (r.bubble) setText(r.bubble, r.text);
  },
  "response.output_audio.delta"(e) {
    if (flushedItems.has(e.item_id) || !player) return;
    const samples = floatsFromB64(e.delta);
    stats.audioDeltas++;
    stats.samplesReceived += samples.length;
    player.port.postMessage({ type: "audio", item: e.item_id, samples }, [samples.buffer]);
    playingItem = e.item_id;
    const r = responses.get(e.response_id);
    if (r && r.firstAudio == null) {
      r.firstAudio = performance.now();
      if (r.end != null) {
        const lat = r.firstAudio - r.end;
        stats.latencies.push(lat);
        if (r.bubble) r.bubble.querySelector(".lat").textContent = `first audio after ${Math.round(lat)} ms`;
      }
      stats.replies++;
      updateLatency();
    }
  },
  "response.done"(e) {
    const r = responses.get(e.response.id);
    if (r) app.transcripts.bot.push(r.text);
    if (e.response.status !== "cancelled") stats.completed++;
    const d = e.response.status_details || {};
    logEvent(`reply ${e.response.id} ${e.response.status}${d.reason ? " (" + d.reason + ")" : ""}`);
  },
  "stepaudio.timings"(e) {
    const t = e.timings_ms || {};
    if (typeof t.end_of_speech_to_first_audio === "number") {
      stats.serverLatencies.push(t.end_of_speech_to_first_audio);
      updateLatency();
    }
  },
  "conversation.item.truncated"(e) {
    stats.truncated.push({ item: e.item_id, audio_end_ms: e.audio_end_ms });
    logEvent(`← truncated ${e.item_id} at ${e.audio_end_ms} ms`);
  },
  "error"(e) {
    const err = e.error || {};
    stats.errors.push(`${err.code}: ${err.message}`);
    logEvent(`error ${err.code}: ${err.message}`);
  },
};

function onMessage(raw) {
  let e;
  try { e = JSON.parse(raw.data); } catch { return; }
  const type = GA[e.type] || e.type;
  app.events.push(type);
  if (app.events.length > 2000) app.events.splice(0, 1000);
  if (type !== "response.output_audio.delta" && type !== "response.output_audio_transcript.delta") {
    logEvent(type);
  }
  const h = handlers[type];
  if (h) h(e);
}

const CLOSE_REASONS = {
  1001: "the server is shutting down",
  1008: "the connection fell behind (send queue full)",
  1011: "the server hit an internal error",
  1013: "the server is full; try again in a moment",
};

// A browser does not say why a WebSocket handshake was refused (it reports close code 1006);
// the server refuses over plain HTTP (401 key, 403 origin or host name, 503 not ready or full),
// so the same request made with fetch reads the reason.
async function refusalReason(apiKey) {
  try {
    const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
    const r = await fetch("/v1/realtime", { headers, cache: "no-store" });
    if (r.status === 401) return "the server refused the API key (Settings → API key)";
    if (r.status === 403 || r.status === 503) return (await r.text()).trim();
  } catch (_) {
    // the server is gone altogether
  }
  return null;
}

// -- start / stop -------------------------------------------------------------------------------

async function start() {
  showProblem("");
  $("start").disabled = true;
  if (!window.isSecureContext) {
    showProblem("The microphone only works in a secure context: open this page as http://localhost " +
      "(an SSH tunnel) or over https (see the README).");
    $("start").disabled = false;
    return;
  }
  try {
    await startAudio();
  } catch (err) {
    showProblem(`Cannot use the microphone: ${err.message || err}`);
    stopAudio();
    $("start").disabled = false;
    return;
  }
  const s = formSettings();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"];
  if (s.api_key) protocols.push(`openai-insecure-api-key.${s.api_key}`);
  sendMarks = [];
  stats.msSent = 0;
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`, protocols);
  ws.onopen = () => {
    app.connected = true;
    $("conn").textContent = "connected";
    $("conn").className = "conn on";
    $("stop").disabled = false;
  };
  ws.onmessage = onMessage;
  ws.onclose = async (e) => {
    const wasOpen = app.connected;
    app.connected = false;
    $("conn").textContent = `disconnected (${e.code})`;
    $("conn").className = "conn off";
    const refused = !wasOpen && e.code === 1006 ? await refusalReason(s.api_key) : null;
    if (refused) {
      showProblem(`Cannot connect: ${refused}`);
    } else if (e.code !== 1000 && e.code !== 1005) {
      showProblem(`Connection closed: ${CLOSE_REASONS[e.code] || e.reason || "code " + e.code}`);
    }
    stopAudio();
    $("start").disabled = false;
    $("stop").disabled = true;
    app.state = "disconnected";
  };
}

function stop() {
  if (ws) ws.close(1000, "bye");
  stopAudio();
}

$("start").onclick = start;
$("stop").onclick = stop;
$("mute").onchange = (e) => capture && capture.port.postMessage({ type: "mute", on: e.target.checked });
$("settings").elements.threshold.oninput = (e) => { $("thr-out").textContent = e.target.value; };
$("settings").onsubmit = (e) => {
  e.preventDefault();
  const s = formSettings();
  const { api_key: _key, ...keep } = s; // the key is not stored in the browser
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(keep));
  $("settings-status").textContent = ws && ws.readyState === WebSocket.OPEN ? "sending…" : "saved";
  send(sessionUpdate(s));
};
loadSettingsForm();
