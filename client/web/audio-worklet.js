// AudioWorklet processors of the browser demo: microphone capture and reply playback.
//
// Both run on the audio thread, so capture never drops samples while the page is busy and
// playback can be stopped within one render quantum (128 samples) when the user barges in.
// The wire format is pcm16 mono at 24 kHz (docs/protocol.md); when the AudioContext cannot run
// at 24 kHz (Firefox refuses a microphone in a context of another rate), these resample.

const WIRE_RATE = 24000;

// A windowed-sinc low-pass (Blackman), so downsampling the microphone does not alias.
function lowpass(cutoff, taps) {
  const h = new Float32Array(taps);
  const m = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - m;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) +
      0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

// Microphone → pcm16 chunks at 24 kHz, posted with their level (for the meter).
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = (options.processorOptions && options.processorOptions.chunkMs) || 40;
    this.ratio = sampleRate / WIRE_RATE; // input samples per output sample
    this.chunk = new Int16Array(Math.round((WIRE_RATE * chunkMs) / 1000));
    this.fill = 0;
    this.t = 0; // position of the next output sample, in input samples since the last one
    this.last = 0;
    this.taps = this.ratio > 1.01 ? lowpass(0.45 / this.ratio, 63) : null;
    this.hist = this.taps ? new Float32Array(this.taps.length) : null;
    this.histPos = 0;
    this.sumSq = 0;
    this.peak = 0;
    this.count = 0;
    this.muted = false;
    this.port.onmessage = (e) => { if (e.data && e.data.type === "mute") this.muted = !!e.data.on; };
  }

  filter(x) {
    if (!this.taps) return x;
    const n = this.taps.length;
    this.hist[this.histPos] = x;
    let y = 0;
    let j = this.histPos;
    for (let i = 0; i < n; i++) {
      y += this.taps[i] * this.hist[j];
      j = j === 0 ? n - 1 : j - 1;
    }
    this.histPos = (this.histPos + 1) % n;
    return y;
  }

  emit(y) {
    const s = Math.max(-1, Math.min(1, this.muted ? 0 : y));
    this.chunk[this.fill++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    this.sumSq += s * s;
    this.peak = Math.max(this.peak, Math.abs(s));
    this.count++;
    if (this.fill === this.chunk.length) {
      const pcm = this.chunk.slice();
      this.port.postMessage({ type: "chunk", pcm, rms: Math.sqrt(this.sumSq / this.count),
        peak: this.peak }, [pcm.buffer]);
      this.fill = 0;
      this.sumSq = 0;
      this.peak = 0;
      this.count = 0;
    }
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      const x = this.filter(input[i]);
      if (this.ratio === 1) {
        this.emit(x);
        continue;
      }
      // Linear interpolation between the previous and this input sample.
      while (this.t <= 1) {
        this.emit(this.last + (x - this.last) * this.t);
        this.t += this.ratio;
      }
      this.t -= 1;
      this.last = x;
    }
    return true;
  }
}

// Reply audio (24 kHz float chunks tagged with their item id) → the speakers.
// Counts what was really played per item, so a barge-in truncates the reply to what was heard.
class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = WIRE_RATE / sampleRate; // wire samples per output sample
    this.queue = []; // {item, data: Float32Array}
    this.t = 0; // read position in queue[0].data
    this.played = new Map(); // item → wire samples played (whole chunks)
    this.total = 0; // wire samples played, all items (whole chunks)
    this.nonSilent = 0; // output samples above -80 dBFS: proof that audio really played
    this.out = 0;
    this.quanta = 0;
    this.wasPlaying = null;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  playedOf(item) {
    let n = this.played.get(item) || 0;
    if (this.queue.length && this.queue[0].item === item) n += Math.floor(this.t);
    return n;
  }

  onMessage(msg) {
    if (msg.type === "audio") {
      this.queue.push({ item: msg.item, data: msg.samples });
    } else if (msg.type === "flush") {
      const item = this.queue.length ? this.queue[0].item : null;
      const played = item ? this.playedOf(item) : 0;
      let dropped = -Math.floor(this.t);
      for (const c of this.queue) dropped += c.data.length;
      this.total += Math.floor(this.t);
      this.queue = [];
      this.t = 0;
      this.port.postMessage({ type: "flushed", item, played, dropped: Math.max(0, dropped) });
      this.report();
    }
  }

  report() {
    const item = this.queue.length ? this.queue[0].item : null;
    let queued = 0;
    for (const c of this.queue) queued += c.data.length;
    queued -= Math.floor(this.t);
    this.port.postMessage({ type: "stats", item, played: item ? this.playedOf(item) : 0,
      queued, nonSilent: this.nonSilent, out: this.out,
      total: this.total + (item ? Math.floor(this.t) : 0) });
    if (this.wasPlaying && !item) {
      this.port.postMessage({ type: "idle", item: this.wasPlaying,
        played: this.played.get(this.wasPlaying) || 0 });
    }
    this.wasPlaying = item;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    for (let i = 0; i < out.length; i++) {
      if (!this.queue.length) {
        out[i] = 0;
        continue;
      }
      const data = this.queue[0].data;
      const k = Math.floor(this.t);
      const frac = this.t - k;
      const next = k + 1 < data.length ? data[k + 1] : data[k];
      const y = data[k] + (next - data[k]) * frac;
      out[i] = y;
      if (Math.abs(y) > 1e-4) this.nonSilent++;
      this.t += this.step;
      while (this.queue.length && this.t >= this.queue[0].data.length) {
        const done = this.queue.shift();
        this.t -= done.data.length;
        this.played.set(done.item, (this.played.get(done.item) || 0) + done.data.length);
        this.total += done.data.length;
      }
      if (!this.queue.length) this.t = 0;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.out += out.length;
    if (++this.quanta % 8 === 0) this.report();
    return true;
  }
}

registerProcessor("stepaudio-capture", CaptureProcessor);
registerProcessor("stepaudio-player", PlayerProcessor);
