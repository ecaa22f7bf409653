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
 *
 * Every comparison alternates its sides (A B A B …) and prints medians with their range.
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { getLlama, LlamaLogLevel, type Llama, type LlamaModel, type Token } from "node-llama-cpp";
import { Histogram, Registry } from "prom-client";
import { HotHistogram } from "../src/telemetry/hot-histogram.js";
import { ROOT } from "./lib/processes.js";
import { binaryOptions } from "../src/engine/engine.js";
import type { EngineBinary } from "../src/engine/types.js";

const SHARED = join(ROOT, "..", "shared", "models");

export const MICRO_COMMANDS = ["startup", "histogram", "threads", "top-k", "flash-attention"] as const;
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
  }
}
