/**
 * Small measurements behind figures the README states, each in one command:
 *
 *   startup          wall time of `node dist/launch.cjs --help` and `npm start -- --help`
 *   histogram        ns per observation: prom-client's labelled Histogram vs the HotHistogram
 *   threads          engine decode tokens/s with 1 and 2 compute threads (one sequence; more threads than
 *                    cores, e.g. the library's default of 4 here, is slower still)
 *   top-k            engine decode ms/token at temperature 1 with top-k 40 vs off, on the 32k vocabulary
 *   flash-attention  prefill and decode with llama.cpp's flash attention on vs off (CPU), per binary
 *                    (--engine-build prebuilt|local), on stories260K and the W2 synthetic model
 *   sampler          ms to make the sampler node-llama-cpp makes for every evaluation (every request),
 *                    per binary (--engine-build prebuilt|local), on the W2 model's 32k vocabulary
 *   step-thread      decode tok/s with steps and samples in libuv jobs vs on the JavaScript thread
 *                    (a local build of the mended addon), one and eight sequences, W2; where a
 *                    token's time goes in jobs; and one greedy sample: the whole sampler chain vs
 *                    the mended addon's scan of the logits
 *
 * Every comparison alternates its sides (A B A B …) and prints medians with their range.
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { getLlama, LlamaLogLevel, TokenBias, type Llama, type LlamaModel, type Token } from "node-llama-cpp";
import { Histogram, Registry } from "prom-client";
import { HotHistogram } from "../src/telemetry/hot-histogram.js";
import { ROOT } from "./lib/processes.js";
import { binaryOptions } from "../src/engine/engine.js";
import { canStepOnJsThread } from "../src/engine/step-thread.js";
import type { EngineBinary } from "../src/engine/types.js";

const SHARED = join(ROOT, "..", "shared", "models");

export const MICRO_COMMANDS = ["startup", "histogram", "threads", "top-k", "flash-attention", "sampler", "step-thread"] as const;
export type MicroCommand = (typeof MICRO_COMMANDS)[number];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

const fmt = (xs: number[], digits = 1) => `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;

/** Runs each side once per round, alternating, and returns every side's samples. */
async function alternate<K extends string>(rounds: number, sides: Record<K, () => Promise<number> | number>): Promise<Record<K, number[]>> {
  const out = Object.fromEntries(Object.keys(sides).map((k) => [k, [] as number[]])) as Record<K, number[]>;
  const keys = Object.keys(sides) as K[];
  for (let r = 0; r < rounds; r++) {
    const order = r % 2 === 0 ? keys : [...keys].reverse();
    for (const k of order) out[k].push(await sides[k]());
  }
  return out;
}

async function startup(rounds: number): Promise<string> {
  const time = (cmd: string, args: string[]) => () => {
    const t0 = performance.now();
    const r = spawnSync(cmd, args, { cwd: ROOT, encoding: "utf8" });
    if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.status}: ${r.stderr}`);
    return performance.now() - t0;
  };
  const r = await alternate(rounds, {
    "node dist/launch.cjs --help": time(process.execPath, ["dist/launch.cjs", "--help"]),
    "npm start -- --help": time("npm", ["start", "--silent", "--", "--help"]),
  });
  return Object.entries(r).map(([k, v]) => `| ${k} | ${fmt(v, 0)} ms |`).join("\n");
}

async function histogram(rounds: number): Promise<string> {
  const n = 2_000_000;
  const registry = new Registry();
  const prom = new Histogram({ name: "p", help: "p", labelNames: ["model", "version"], buckets: [0.001, 0.01, 0.1, 1], registers: [registry] });
  const hot = new HotHistogram("h", "h", [0.001, 0.01, 0.1, 1], registry).child({ model: "m", version: "v" });
  const labels = { model: "m", version: "v" };
  const r = await alternate(rounds, {
    "prom-client Histogram.observe(labels, v)": () => {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) prom.observe(labels, (i & 1023) / 1000);
      return ((performance.now() - t0) * 1e6) / n;
    },
    "HotHistogram child.observe(v)": () => {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) hot.observe((i & 1023) / 1000);
      return ((performance.now() - t0) * 1e6) / n;
    },
  });
  return Object.entries(r).map(([k, v]) => `| ${k} | ${fmt(v, 1)} ns |`).join("\n");
}

async function withModel<T>(file: string, fn: (llama: Llama, model: LlamaModel) => Promise<T>): Promise<T> {
  const llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error });
  const model = await llama.loadModel({ modelPath: join(SHARED, file) });
  try {
    return await fn(llama, model);
  } finally {
    await model.dispose();
    await llama.dispose();
  }
}

/** Tokens/s of one sequence decoding `n` tokens with these settings. */
async function decodeRate(model: LlamaModel, opts: { threads: number; n: number; topK?: number; temperature?: number }): Promise<number> {
  const ctx = await model.createContext({ contextSize: 1024, sequences: 1, threads: opts.threads });
  try {
    const seq = ctx.getSequence();
    const prompt = model.tokenize("Once upon a time", true);
    let count = 0;
    let t0 = 0;
    for await (const _ of seq.evaluate(prompt, { temperature: opts.temperature ?? 0, topK: opts.topK ?? 1, yieldEogToken: true })) {
      if (count === 0) t0 = performance.now();
      if (++count > opts.n) break;
    }
    return (opts.n / (performance.now() - t0)) * 1000;
  } finally {
    await ctx.dispose();
  }
}

async function threads(rounds: number): Promise<string> {
  return withModel("stories260K.gguf", async (_l, model) => {
    const r = await alternate(rounds, {
      "1 thread": () => decodeRate(model, { threads: 1, n: 200 }),
      "2 threads": () => decodeRate(model, { threads: 2, n: 200 }),
    });
    return Object.entries(r).map(([k, v]) => `| stories260K, ${k} | ${fmt(v, 0)} tokens/s |`).join("\n");
  });
}

async function topK(rounds: number): Promise<string> {
  return withModel("llama-2-tiny-random.gguf", async (_l, model) => {
    const ms = (tps: number) => 1000 / tps;
    const r = await alternate(rounds, {
      "top-k 40": async () => ms(await decodeRate(model, { threads: 1, n: 200, temperature: 1, topK: 40 })),
      "top-k off (0)": async () => ms(await decodeRate(model, { threads: 1, n: 200, temperature: 1, topK: 0 })),
    });
    return Object.entries(r).map(([k, v]) => `| llama-2-tiny-random (32k vocabulary), temperature 1, ${k} | ${fmt(v, 2)} ms/token |`).join("\n");
  });
}

/**
 * Flash attention on vs off, per binary (prebuilt or local build: their FA kernels differ),
 * on two head sizes: stories260K (8 per head) and the W2 synthetic 25m (32). Decode is
 * timed after a short prompt (most of the padded KV masked, which FA skips) and after 512
 * tokens (all of it in use).
 */
async function flashAttention(rounds: number, w2Path: string, binary: EngineBinary): Promise<string> {
  const rows: string[] = [];
  const llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error, ...binaryOptions(binary) });
  const kind = llama.buildType === "localBuild" ? "local build" : "prebuilt";
  try {
    for (const [name, path, promptTokens] of [["stories260K", join(SHARED, "stories260K.gguf"), 1800], ["W2 25m", w2Path, 512]] as const) {
      const model = await llama.loadModel({ modelPath: path });
      try {
        const long = model.tokenize("Once upon a time, there was a little girl named Lily. ".repeat(120), true).slice(0, promptTokens) as Token[];
        const short = model.tokenize("Once upon a time", true) as Token[];
        const run = (flash: boolean, what: "prefill" | "decode-short" | "decode-long") => async () => {
          const ctx = await model.createContext({ contextSize: 2048, sequences: 1, threads: 1, flashAttention: flash, batchSize: 512 });
          try {
            const seq = ctx.getSequence();
            if (what === "prefill") {
              const t0 = performance.now();
              await seq.evaluateWithoutGeneratingNewTokens(long);
              return performance.now() - t0;
            }
            const prompt = what === "decode-short" ? short : long;
            let n = 0;
            let t0 = 0;
            for await (const _ of seq.evaluate(prompt, { temperature: 0, topK: 1, yieldEogToken: true })) {
              if (n === 0) t0 = performance.now();
              if (++n > 128) break;
            }
            return (performance.now() - t0) / 128;
          } finally {
            await ctx.dispose();
          }
        };
        for (const what of ["prefill", "decode-short", "decode-long"] as const) {
          if (name === "stories260K" && what !== "prefill") continue;
          const r = await alternate(rounds, { off: run(false, what), on: run(true, what) });
          const label = what === "prefill" ? `prefill ${long.length} tokens` : what === "decode-short" ? `decode after ${short.length} tokens` : `decode after ${long.length} tokens`;
          const unit = what === "prefill" ? "ms" : "ms/token";
          const ratio = r.on.map((v, i) => v / r.off[i]!);
          rows.push(`| ${kind} | ${name} | ${label} | ${fmt(r.off, 2)} ${unit} | ${fmt(r.on, 2)} ${unit} | ${fmt(ratio, 2)} |`);
        }
      } finally {
        await model.dispose();
      }
    }
  } finally {
    await llama.dispose();
  }
  return `| binary | model | what | flash attention off | on | on ÷ off |\n|---|---|---|---|---|---|\n${rows.join("\n")}`;
}

/**
 * The sampler node-llama-cpp makes on the JavaScript thread at the start of every
 * evaluation (LlamaContextSequence._evaluate: one per request) and disposes at its end, as
 * it does: made, disposed, dropped, the next made. The addon's constructor sizes a
 * candidate array to the whole vocabulary; the local build's mend 5
 * (scripts/patch-node-llama-cpp.mjs) hands a disposed sampler's array to the next.
 * Each round times 50 samplers, after 5 not timed.
 */
async function samplerCost(rounds: number, w2Path: string, binary: EngineBinary): Promise<string> {
  const llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error, ...binaryOptions(binary) });
  const kind = llama.buildType === "localBuild" ? "local build" : "prebuilt";
  try {
    const model = await llama.loadModel({ modelPath: w2Path });
    const bindings = (llama as unknown as { _bindings: { AddonSampler: new (m: unknown) => { dispose(): void } } })._bindings;
    const addonModel = (model as unknown as { _model: unknown })._model;
    const round = () => {
      const times: number[] = [];
      for (let i = 0; i < 55; i++) {
        const t0 = performance.now();
        const sampler = new bindings.AddonSampler(addonModel);
        if (i >= 5) times.push(performance.now() - t0);
        sampler.dispose();
      }
      return median(times);
    };
    const r = await alternate(rounds, { make: round });
    await model.dispose();
    return `| ${kind} | W2 25m (a 32k vocabulary) | ${fmt(r.make, 3)} ms |`;
  } finally {
    await llama.dispose();
  }
}

interface AddonContextCalls {
  decodeBatch(): Promise<void>;
  sampleToken(...args: unknown[]): Promise<unknown>;
  decodeBatchNow(): Promise<void>;
  sampleTokenNow(...args: unknown[]): Promise<unknown>;
}

/**
 * Steps in libuv jobs (node-llama-cpp's way) against samples, then steps and samples, on
 * the JavaScript thread (step-thread.ts), with node-llama-cpp alone on one context: one
 * sequence and eight, 128 greedy tokens each, W2's 32k vocabulary. In the jobs rounds each
 * call's time from call to result is recorded: the decode job, the sample job, and the
 * JavaScript thread's time from a sample's result to the next decode.
 */
async function stepThread(rounds: number, w2Path: string): Promise<string> {
  const llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error, ...binaryOptions("local") });
  if (!canStepOnJsThread(llama)) {
    await llama.dispose();
    throw new Error("step-thread: needs a local build of the mended addon source (npm ci, then npm run engine:build)");
  }
  const rows: string[] = [];
  try {
    const model = await llama.loadModel({ modelPath: w2Path });
    const ctx = await model.createContext({ contextSize: 8 * 512, sequences: 8, threads: 1, flashAttention: true, batchSize: 512 });
    const addon = (ctx as unknown as { _ctx: AddonContextCalls })._ctx;
    const jobs = { decode: addon.decodeBatch.bind(addon), sample: addon.sampleToken.bind(addon) };
    const here = { decode: addon.decodeBatchNow.bind(addon), sample: addon.sampleTokenNow.bind(addon) };
    let mode: "jobs" | "samples here" | "steps here" = "jobs";
    /** Per call in jobs mode: [kind, start, end]. */
    const calls: Array<[string, number, number]> = [];
    const timed = <T>(kind: string, p: Promise<T>, t0: number): Promise<T> => p.then((v) => (calls.push([kind, t0, performance.now()]), v));
    Object.defineProperty(addon, "decodeBatch", {
      configurable: true,
      value: () => (mode === "steps here" ? here.decode() : mode === "jobs" ? timed("decode", jobs.decode(), performance.now()) : jobs.decode()),
    });
    Object.defineProperty(addon, "sampleToken", {
      configurable: true,
      value: (...a: unknown[]) => (mode === "jobs" ? timed("sample", jobs.sample(...a), performance.now()) : here.sample(...a)),
    });
    const prompt = model.tokenize("Once upon a time, in a land far away, there lived", true) as Token[];
    for (const n of [1, 8]) {
      const seqs = Array.from({ length: n }, () => ctx.getSequence());
      const run = (m: typeof mode) => async () => {
        mode = m;
        await Promise.all(seqs.map((s) => s.clearHistory()));
        const t0 = performance.now();
        let tokens = 0;
        await Promise.all(
          seqs.map(async (s) => {
            let k = 0;
            for await (const _ of s.evaluate(prompt, { temperature: 0, topK: 1, yieldEogToken: true })) {
              tokens++;
              if (++k >= 128) break;
            }
          }),
        );
        return (tokens / (performance.now() - t0)) * 1000;
      };
      calls.length = 0;
      const r = await alternate(rounds, { jobs: run("jobs"), "samples here": run("samples here"), "steps here": run("steps here") });
      for (const k of ["samples here", "steps here"] as const) {
        rows.push(`| ${n} | ${k} ÷ jobs | ${fmt(r.jobs, 0)} tok/s | ${fmt(r[k], 0)} tok/s | ${fmt(r[k].map((v, i) => v / r.jobs[i]!), 2)} |`);
      }
      if (n === 1) {
        // Skip each round's prompt step: the decode jobs that follow a sample.
        const decode: number[] = [];
        const sample: number[] = [];
        const back: number[] = [];
        for (let i = 1; i < calls.length; i++) {
          const [kind, start, end] = calls[i]!;
          const prev = calls[i - 1]!;
          if (kind === "decode" && prev[0] === "sample" && start - prev[2] < 5) {
            decode.push(end - start);
            back.push(start - prev[2]);
          }
          if (kind === "sample") sample.push(end - start);
        }
        rows.push(`| 1 | in jobs, per token: decode job ${fmt(decode, 3)} ms, sample job ${fmt(sample, 3)} ms, sample's result to the next decode ${fmt(back, 3)} ms | | | |`);
      }
      for (const s of seqs) s.dispose();
    }
    rows.push(await greedySampleCost(rounds, model, ctx, here.sample, (f) => (mode = "steps here", Object.defineProperty(addon, "sampleToken", { configurable: true, value: f }))));
    await ctx.dispose();
    await model.dispose();
  } finally {
    await llama.dispose();
  }
  return `libuv pool: ${process.env.UV_THREADPOOL_SIZE ?? "4 (default)"} thread(s)\n\n| sequences | what | jobs | here | here ÷ jobs |\n|---|---|---|---|---|\n${rows.join("\n")}`;
}

/**
 * One greedy sample on the JavaScript thread, timed per call: through the whole sampler
 * chain (a token bias of +0 on one token keeps the chain in the way and changes nothing)
 * against the mended addon's scan of the logits (a plain greedy sampler).
 */
async function greedySampleCost(
  rounds: number,
  model: LlamaModel,
  ctx: Awaited<ReturnType<LlamaModel["createContext"]>>,
  sampleNow: (...a: unknown[]) => Promise<unknown>,
  routeSamples: (f: (...a: unknown[]) => Promise<unknown>) => void,
): Promise<string> {
  const seq = ctx.getSequence();
  const prompt = model.tokenize("Once upon a time, in a land far away, there lived", true) as Token[];
  const bias = new TokenBias(model.tokenizer).set(prompt[prompt.length - 1]!, { logit: 0 });
  const run = (withBias: boolean) => async () => {
    const times: number[] = [];
    routeSamples((...a) => {
      const t0 = performance.now();
      const p = sampleNow(...a);
      times.push(performance.now() - t0);
      return p;
    });
    await seq.clearHistory();
    let k = 0;
    for await (const _ of seq.evaluate(prompt, { temperature: 0, yieldEogToken: true, ...(withBias ? { tokenBias: bias } : {}) })) if (++k >= 128) break;
    times.sort((a, b) => a - b);
    return times[times.length >> 1]! * 1000;
  };
  const r = await alternate(rounds, { chain: run(true), scan: run(false) });
  seq.dispose();
  return `| 1 | one greedy sample on the JavaScript thread (µs, median per round): whole sampler chain ${fmt(r.chain, 1)}, the scan of the logits ${fmt(r.scan, 1)} | | | ${fmt(r.scan.map((v, i) => v / r.chain[i]!), 2)} |`;
}

export async function micro(command: MicroCommand, rounds: number, opts: { w2Path?: string; engineBuild?: EngineBinary } = {}): Promise<string> {
  const header = "| measurement | median (min–max) |\n|---|---|\n";
  switch (command) {
    case "startup":
      return header + (await startup(rounds));
    case "histogram":
      return header + (await histogram(rounds));
    case "threads":
      return header + (await threads(rounds));
    case "top-k":
      return header + (await topK(rounds));
    case "flash-attention":
      return flashAttention(rounds, opts.w2Path!, opts.engineBuild ?? "auto");
    case "sampler":
      return `| binary | model | one sampler made (median of 50, per round) |\n|---|---|---|\n${await samplerCost(rounds, opts.w2Path!, opts.engineBuild ?? "auto")}`;
    case "step-thread":
      return stepThread(rounds, opts.w2Path!);
  }
}
