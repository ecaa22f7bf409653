/**
 * Synthetic GGUF models for compute-bound benchmarks without downloads: the llama
 * architecture at a chosen shape, random weights from a seed, and the real tokenizer
 * and chat template copied from a shared model. They load in node-llama-cpp and in
 * llama-server; their output is gibberish, their cost per token is a real model's.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { readGgufFileInfo } from "node-llama-cpp";
import { rng } from "./lib/load.js";

export interface ModelShape {
  layers: number;
  hidden: number;
  heads: number;
  kvHeads: number;
  ffn: number;
  contextLength: number;
}

/** Named shapes: a small one for CPU runs here, and real Llama shapes for GPU runs. */
export const PRESETS: Record<string, ModelShape & { note: string }> = {
  tiny: { layers: 2, hidden: 64, heads: 4, kvHeads: 2, ffn: 128, contextLength: 2048, note: "for tests" },
  "25m": { layers: 8, hidden: 256, heads: 8, kvHeads: 4, ffn: 1024, contextLength: 2048, note: "~25M parameters with the 32k Llama-2 vocabulary: CPU runs" },
  "llama-1b": { layers: 16, hidden: 2048, heads: 32, kvHeads: 8, ffn: 8192, contextLength: 8192, note: "Llama 3.2 1B's shape (with a 32k vocabulary)" },
  "llama-8b": { layers: 32, hidden: 4096, heads: 32, kvHeads: 8, ffn: 14336, contextLength: 8192, note: "Llama 3.1 8B's shape (with a 32k vocabulary)" },
};

export type WeightType = "f16" | "q8_0" | "q4_0";

const GGML = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 8 } as const;
const GGUF_TYPE = { UINT32: 4, INT32: 5, FLOAT32: 6, STRING: 8, ARRAY: 9, UINT64: 10 } as const;
const ALIGN = 32;
const Q8_BLOCK = 32;

interface TensorPlan {
  name: string;
  dims: number[];
  type: number;
  /** Rows of dims[0] values; norms are ones, everything else random (zeros: see SynthOptions.zeroFrom). */
  fill: "ones" | "random" | "zeros";
  /** Multiplies the random values (SynthOptions.outputScale for output.weight). */
  scale?: number;
  bytes: number;
  offset: number;
}

/** Parameters of the llama graph at this shape and vocabulary size. */
export function parameterCount(s: ModelShape, vocab: number): number {
  const headDim = s.hidden / s.heads;
  const kv = s.kvHeads * headDim;
  const perLayer = 2 * s.hidden * s.hidden + 2 * s.hidden * kv + 3 * s.hidden * s.ffn + 2 * s.hidden;
  return 2 * vocab * s.hidden + s.layers * perLayer + s.hidden;
}

function tensorBytes(dims: number[], type: number): number {
  const n = dims.reduce((a, b) => a * b, 1);
  if (type === GGML.F32) return n * 4;
  if (type === GGML.F16) return n * 2;
  // Q4_0: an f16 scale and 32 4-bit values per block; Q8_0: an f16 scale and 32 bytes.
  if (type === GGML.Q4_0) return (n / Q8_BLOCK) * (2 + Q8_BLOCK / 2);
  return (n / Q8_BLOCK) * (2 + Q8_BLOCK);
}

function plan(s: ModelShape, vocab: number, weights: WeightType, zeroFrom = Infinity, outputScale = 1): TensorPlan[] {
  const w = weights === "f16" ? GGML.F16 : weights === "q4_0" ? GGML.Q4_0 : GGML.Q8_0;
  const kv = s.kvHeads * (s.hidden / s.heads);
  const list: Array<Omit<TensorPlan, "bytes" | "offset">> = [
    { name: "token_embd.weight", dims: [s.hidden, vocab], type: w, fill: "random" },
    { name: "output_norm.weight", dims: [s.hidden], type: GGML.F32, fill: "ones" },
    { name: "output.weight", dims: [s.hidden, vocab], type: w, fill: "random", scale: outputScale },
  ];
  for (let i = 0; i < s.layers; i++) {
    // A layer whose two output projections are zero adds exactly nothing to the residual
    // stream: it costs what a layer costs and changes no logit.
    const out = i >= zeroFrom ? "zeros" : "random";
    list.push(
      { name: `blk.${i}.attn_norm.weight`, dims: [s.hidden], type: GGML.F32, fill: "ones" },
      { name: `blk.${i}.attn_q.weight`, dims: [s.hidden, s.hidden], type: w, fill: "random" },
      { name: `blk.${i}.attn_k.weight`, dims: [s.hidden, kv], type: w, fill: "random" },
      { name: `blk.${i}.attn_v.weight`, dims: [s.hidden, kv], type: w, fill: "random" },
      { name: `blk.${i}.attn_output.weight`, dims: [s.hidden, s.hidden], type: w, fill: out },
      { name: `blk.${i}.ffn_norm.weight`, dims: [s.hidden], type: GGML.F32, fill: "ones" },
      { name: `blk.${i}.ffn_gate.weight`, dims: [s.hidden, s.ffn], type: w, fill: "random" },
      { name: `blk.${i}.ffn_up.weight`, dims: [s.hidden, s.ffn], type: w, fill: "random" },
      { name: `blk.${i}.ffn_down.weight`, dims: [s.ffn, s.hidden], type: w, fill: out },
    );
  }
  let offset = 0;
  return list.map((t) => {
    const bytes = tensorBytes(t.dims, t.type);
    const p = { ...t, bytes, offset };
    offset += Math.ceil(bytes / ALIGN) * ALIGN;
    return p;
  });
}

/** IEEE 754 half from a float, round to nearest even. */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
export function toHalf(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}

class Writer {
  private parts: Buffer[] = [];
  u32(v: number) {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.parts.push(b);
  }
  i32(v: number) {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v);
    this.parts.push(b);
  }
  u64(v: number) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.parts.push(b);
  }
  f32(v: number) {
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    this.parts.push(b);
  }
  str(s: string) {
    const b = Buffer.from(s, "utf8");
    this.u64(b.length);
    this.parts.push(b);
  }
  kv(key: string, type: number, write: () => void) {
    this.str(key);
    this.u32(type);
    write();
  }
  get length() {
    return this.parts.reduce((a, b) => a + b.length, 0);
  }
  buffer() {
    return Buffer.concat(this.parts);
  }
}

export interface SynthOptions {
  shape: ModelShape;
  weights: WeightType;
  seed: number;
  /** A GGUF whose tokenizer and chat template are copied (llama tokenizer). */
  tokenizerFrom: string;
  name?: string;
  /**
   * Layers from this one on get zero output projections (attn_output, ffn_down). The model
   * then computes what its first `zeroFrom` layers compute, at its full cost: with the same
   * seed, a model of `zeroFrom` layers is a draft that agrees with it token for token.
   */
  zeroFrom?: number;
  /** Scales output.weight: above 1 the logits spread and the model is sure of its tokens, as trained ones are. */
  outputScale?: number;
}

/** Writes the model; returns its parameter count. */
export async function writeSyntheticGguf(outPath: string, o: SynthOptions): Promise<{ parameters: number; vocab: number; bytes: number }> {
  const s = o.shape;
  if (s.hidden % s.heads !== 0) throw new Error("hidden must be a multiple of heads");
  if (s.heads % s.kvHeads !== 0) throw new Error("heads must be a multiple of kvHeads");
  if (o.weights !== "f16" && (s.hidden % Q8_BLOCK !== 0 || s.ffn % Q8_BLOCK !== 0)) throw new Error(`${o.weights.toUpperCase()} needs hidden and ffn to be multiples of 32`);
  const src = (await readGgufFileInfo(o.tokenizerFrom)).metadata as unknown as {
    tokenizer: { ggml: { model: string; tokens: string[]; scores: number[]; token_type: number[]; bos_token_id?: number; eos_token_id?: number; unknown_token_id?: number }; chat_template?: string };
  };
  const tok = src.tokenizer.ggml;
  const vocab = tok.tokens.length;
  const tensors = plan(s, vocab, o.weights, o.zeroFrom, o.outputScale);

  const w = new Writer();
  w.u32(0x46554747); // "GGUF"
  w.u32(3);
  w.u64(tensors.length);
  const kvs: Array<[string, number, () => void]> = [
    ["general.architecture", GGUF_TYPE.STRING, () => w.str("llama")],
    ["general.name", GGUF_TYPE.STRING, () => w.str(o.name ?? "spindle-synthetic")],
    ["general.file_type", GGUF_TYPE.UINT32, () => w.u32(o.weights === "f16" ? 1 : 7)],
    ["general.alignment", GGUF_TYPE.UINT32, () => w.u32(ALIGN)],
    ["llama.context_length", GGUF_TYPE.UINT32, () => w.u32(s.contextLength)],
    ["llama.embedding_length", GGUF_TYPE.UINT32, () => w.u32(s.hidden)],
    ["llama.block_count", GGUF_TYPE.UINT32, () => w.u32(s.layers)],
    ["llama.feed_forward_length", GGUF_TYPE.UINT32, () => w.u32(s.ffn)],
    ["llama.rope.dimension_count", GGUF_TYPE.UINT32, () => w.u32(s.hidden / s.heads)],
    ["llama.attention.head_count", GGUF_TYPE.UINT32, () => w.u32(s.heads)],
    ["llama.attention.head_count_kv", GGUF_TYPE.UINT32, () => w.u32(s.kvHeads)],
    ["llama.attention.layer_norm_rms_epsilon", GGUF_TYPE.FLOAT32, () => w.f32(1e-5)],
    ["tokenizer.ggml.model", GGUF_TYPE.STRING, () => w.str(tok.model)],
    ["tokenizer.ggml.tokens", GGUF_TYPE.ARRAY, () => (w.u32(GGUF_TYPE.STRING), w.u64(vocab), tok.tokens.forEach((t) => w.str(t)))],
    ["tokenizer.ggml.scores", GGUF_TYPE.ARRAY, () => (w.u32(GGUF_TYPE.FLOAT32), w.u64(vocab), tok.scores.forEach((v) => w.f32(v)))],
    ["tokenizer.ggml.token_type", GGUF_TYPE.ARRAY, () => (w.u32(GGUF_TYPE.INT32), w.u64(vocab), tok.token_type.forEach((v) => w.i32(v)))],
  ];
  if (tok.bos_token_id !== undefined) kvs.push(["tokenizer.ggml.bos_token_id", GGUF_TYPE.UINT32, () => w.u32(tok.bos_token_id!)]);
  if (tok.eos_token_id !== undefined) kvs.push(["tokenizer.ggml.eos_token_id", GGUF_TYPE.UINT32, () => w.u32(tok.eos_token_id!)]);
  if (tok.unknown_token_id !== undefined) kvs.push(["tokenizer.ggml.unknown_token_id", GGUF_TYPE.UINT32, () => w.u32(tok.unknown_token_id!)]);
  if (src.tokenizer.chat_template) kvs.push(["tokenizer.chat_template", GGUF_TYPE.STRING, () => w.str(src.tokenizer.chat_template!)]);
  w.u64(kvs.length);
  for (const [k, t, write] of kvs) w.kv(k, t, write);
  for (const t of tensors) {
    w.str(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(t.type);
    w.u64(t.offset);
  }
  const header = w.buffer();
  const fd = openSync(outPath, "w");
  let written = 0;
  const put = (b: Buffer | Uint8Array) => {
    writeSync(fd, b);
    written += b.length;
  };
  try {
    put(header);
    put(Buffer.alloc(Math.ceil(header.length / ALIGN) * ALIGN - header.length));
    const dataStart = written;
    const rand = rng(o.seed);
    // Normal(0, 0.02) from Box–Muller: small weights keep activations finite.
    const normal = () => 0.02 * Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
    for (const t of tensors) {
      if (written - dataStart !== t.offset) put(Buffer.alloc(dataStart + t.offset - written));
      const rowLen = t.dims[0]!;
      const rows = t.dims.slice(1).reduce((a, b) => a * b, 1);
      const row = new Float32Array(rowLen);
      // Write a few thousand rows at a time.
      const rowsPerChunk = Math.max(1, Math.floor((1 << 20) / rowLen));
      for (let r0 = 0; r0 < rows; r0 += rowsPerChunk) {
        const n = Math.min(rowsPerChunk, rows - r0);
        const out = Buffer.alloc(tensorBytes([rowLen, n], t.type));
        let pos = 0;
        for (let r = 0; r < n; r++) {
          const scale = t.scale ?? 1;
          for (let i = 0; i < rowLen; i++) row[i] = t.fill === "ones" ? 1 : t.fill === "zeros" ? 0 : scale * normal();
          if (t.type === GGML.F32) for (let i = 0; i < rowLen; i++, pos += 4) out.writeFloatLE(row[i]!, pos);
          else if (t.type === GGML.F16) for (let i = 0; i < rowLen; i++, pos += 2) out.writeUInt16LE(toHalf(row[i]!), pos);
          else if (t.type === GGML.Q4_0) {
            // As llama.cpp quantizes: d = (the value of largest magnitude) / -8, q = x/d + 8 in 0..15;
            // element j and j+16 share a byte (low and high nibble).
            for (let b = 0; b < rowLen; b += Q8_BLOCK) {
              let max = 0;
              for (let i = 0; i < Q8_BLOCK; i++) if (Math.abs(row[b + i]!) > Math.abs(max)) max = row[b + i]!;
              const d = max / -8;
              const id = d === 0 ? 0 : 1 / d;
              out.writeUInt16LE(toHalf(d), pos);
              pos += 2;
              const q = (x: number) => Math.min(15, Math.trunc(x * id + 8.5));
              for (let i = 0; i < Q8_BLOCK / 2; i++, pos++) out.writeUInt8(q(row[b + i]!) | (q(row[b + i + Q8_BLOCK / 2]!) << 4), pos);
            }
          } else {
            for (let b = 0; b < rowLen; b += Q8_BLOCK) {
              let amax = 0;
              for (let i = 0; i < Q8_BLOCK; i++) amax = Math.max(amax, Math.abs(row[b + i]!));
              const d = amax / 127;
              out.writeUInt16LE(toHalf(d), pos);
              pos += 2;
              for (let i = 0; i < Q8_BLOCK; i++, pos++) out.writeInt8(d === 0 ? 0 : Math.max(-127, Math.min(127, Math.round(row[b + i]! / d))), pos);
            }
          }
        }
        put(out);
      }
    }
  } finally {
    closeSync(fd);
  }
  return { parameters: parameterCount(s, vocab), vocab, bytes: written };
}
