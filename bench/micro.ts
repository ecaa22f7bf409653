/**
 * Small measurements behind figures the README states, each in one command:
 *
 *   startup          wall time of `node dist/launch.cjs --help` and `npm start -- --help`
 *   histogram        ns per observation: prom-client's labelled Histogram vs the HotHistogram
 *   threads          engine decode tokens/s with 1 and 2 compute threads (one sequence; more threads than
 *                    cores, e.g. the library's default of 4 here, is slower still)
 *   top-k            engine decode ms/token at temperature 1 with top-k 40 vs off, on the 32k vocabulary
 *   flash-attention  prefill of a long prompt with llama.cpp's flash attention on vs off (CPU)
 *
 * Every comparison alternates its sides (A B A B …) and prints medians with their range.
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { getLlama, LlamaLogLevel, type Llama, type LlamaModel, type Token } from "node-llama-cpp";
import { Histogram, Registry } from "prom-client";
import { HotHistogram } from "../src/telemetry/hot-histogram.js";
import { ROOT } from "./lib/processes.js";

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

async function flashAttention(rounds: number): Promise<string> {
  return withModel("stories260K.gguf", async (_l, model) => {
    const prompt = model.tokenize("Once upon a time, there was a little girl named Lily. ".repeat(120), true).slice(0, 1900) as Token[];
    const prefill = (flash: boolean) => async () => {
      const ctx = await model.createContext({ contextSize: 2048, sequences: 1, threads: 1, flashAttention: flash, batchSize: 512 });
      try {
        const t0 = performance.now();
        await ctx.getSequence().evaluateWithoutGeneratingNewTokens(prompt);
        return performance.now() - t0;
      } finally {
        await ctx.dispose();
      }
    };
    const r = await alternate(rounds, { "flash attention off": prefill(false), "flash attention on": prefill(true) });
    return Object.entries(r).map(([k, v]) => `| stories260K, prefill ${prompt.length} tokens, ${k} | ${fmt(v, 0)} ms |`).join("\n");
  });
}

export async function micro(command: MicroCommand, rounds: number): Promise<string> {
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
      return header + (await flashAttention(rounds));
  }
}
