import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { helpText, parseCommandLine } from "../src/config/cli.js";
import { loadModelsFile } from "../src/config/models-file.js";
import { defaultServerOptions, OPTIONS, optionsTable } from "../src/config/options.js";
import { ConfigError } from "../src/errors.js";
import { sharedModel } from "./helpers/server.js";

const ROOT = resolve(import.meta.dirname, "..");
const writeTemp = (text: string) => {
  const file = join(mkdtempSync(join(tmpdir(), "spindle-cli-")), "models.yaml");
  writeFileSync(file, text);
  return file;
};

function run(args: string[], env: Record<string, string> = {}) {
  return spawnSync(process.execPath, ["dist/launch.cjs", ...args], {
    cwd: ROOT,
    encoding: "utf8",
    env: { ...process.env, ...env },
    timeout: 60_000,
  });
}

/** Starts the server and resolves with its URL once it prints the listening line. */
function startProcess(args: string[], env: Record<string, string> = {}) {
  const child = spawn(process.execPath, ["dist/launch.cjs", ...args], { cwd: ROOT, env: { ...process.env, ...env } });
  let out = "";
  let err = "";
  const url = new Promise<string>((resolveUrl, reject) => {
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      const m = /^listening on (http:\/\/\S+)$/m.exec(out);
      if (m) resolveUrl(m[1]!);
    });
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("exit", (code) => reject(new Error(`exited ${code}: ${err}`)));
  });
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  return { child, url, exited, output: () => out, errors: () => err };
}

describe("command line parsing", () => {
  it("reads options, with environment variables as fallbacks", () => {
    const r = parseCommandLine(["--port", "0", "--model", "/m/a.gguf", "--model", "/m/b.gguf=bee", "--parallel", "3"], { SPINDLE_CTX_SIZE: "256", SPINDLE_PORT: "9" });
    expect(r.kind).toBe("run");
    if (r.kind !== "run") return;
    expect(r.options.port).toBe(0);
    expect(r.options.models).toEqual([
      { path: "/m/a.gguf", id: "a" },
      { path: "/m/b.gguf", id: "bee" },
    ]);
    expect(r.options.parallel).toBe(3);
    expect(r.options.ctxSize).toBe(256);
    expect(r.options.threads).toBeGreaterThanOrEqual(1);
    // A switch: given, or from its variable; the command line wins.
    const on = (argv: string[], env: Record<string, string>) => {
      const p = parseCommandLine(argv, env);
      return p.kind === "run" ? p.options.embeddings : undefined;
    };
    expect(on([], {})).toBe(false);
    expect(on(["--embeddings"], {})).toBe(true);
    expect(on([], { SPINDLE_EMBEDDINGS: "on" })).toBe(true);
    expect(() => on([], { SPINDLE_EMBEDDINGS: "maybe" })).toThrow(/SPINDLE_EMBEDDINGS/);
  });

  it("reads slot classes: smallest first, one size merged; refuses what is not COUNTxTOKENS", () => {
    const slots = (raw: string) => {
      const r = parseCommandLine(["--slots", raw], {});
      return r.kind === "run" ? r.options.slots : undefined;
    };
    expect(slots("1x4096, 8x512")).toEqual([
      { count: 8, ctxSize: 512 },
      { count: 1, ctxSize: 4096 },
    ]);
    expect(slots("2x256,3x256")).toEqual([{ count: 5, ctxSize: 256 }]);
    for (const bad of ["8", "8x", "0x512", "8x8", "8x512;1x1024"]) expect(() => slots(bad), bad).toThrow(/--slots/);
    expect(() => loadModelsFile(writeTemp("models:\n  - id: m\n    file: a.gguf\n    parallel: 2\n    slots: [{ count: 1, ctx_size: 512 }]\n"))).toThrow(/field slots: give slots, or parallel and ctx_size, not both/);
    expect(loadModelsFile(writeTemp("models:\n  - id: m\n    file: a.gguf\n    slots: [{ count: 1, ctx_size: 4096 }, { count: 8, ctx_size: 512 }]\n")).models[0]!.versions[0]!.slots).toEqual([
      { count: 8, ctxSize: 512 },
      { count: 1, ctxSize: 4096 },
    ]);
  });

  it("reads speculation: prompt lookup, or a draft model from --model-draft or the models file's speculative.model; refuses a half-given draft", () => {
    const spec = (argv: string[]) => {
      const r = parseCommandLine(argv, {});
      return r.kind === "run" ? r.options.speculative : undefined;
    };
    expect(spec(["--speculative", "ngram:5"])).toEqual({ method: "ngram", tokens: 5, minPattern: 1 });
    expect(spec(["--model-draft", "d.gguf"])).toEqual({ method: "draft", tokens: 8, path: resolve("d.gguf"), minConfidence: 0.6 });
    expect(spec(["--speculative", "draft:8", "--model-draft", "/m/d.gguf", "--draft-p-min", "0"])).toEqual({ method: "draft", tokens: 8, path: "/m/d.gguf", minConfidence: 0 });
    const limit = parseCommandLine(["--speculative-disable-by-batch-size", "4"], {});
    expect(limit.kind === "run" && [limit.options.speculative, limit.options.speculativeDisableByBatchSize]).toEqual([undefined, 4]);
    expect(() => spec(["--speculative", "draft"])).toThrow(/--speculative draft: name the draft model with --model-draft FILE/);
    expect(() => spec(["--speculative", "ngram", "--model-draft", "d.gguf"])).toThrow(/--model-draft: goes with --speculative draft/);
    for (const bad of [["--speculative", "ngram:17"], ["--speculative", "draft:0"], ["--speculative", "eagle"], ["--draft-p-min", "2"]]) expect(() => spec(bad), bad.join(" ")).toThrow(ConfigError);
    const file = writeTemp(`models:\n  - id: m\n    file: a.gguf\n    speculative: { model: drafts/d.gguf, sha256: ${"AB".repeat(32)}, num_speculative_tokens: 5 }\n`);
    expect(loadModelsFile(file).models[0]!.versions[0]!.speculative).toEqual({ method: "draft", tokens: 5, path: join(dirname(file), "drafts", "d.gguf"), sha256: "ab".repeat(32), minConfidence: 0.6 });
    expect(loadModelsFile(writeTemp("models:\n  - id: m\n    file: a.gguf\n    speculative: { method: ngram }\n")).models[0]!.versions[0]!.speculative).toEqual({ method: "ngram", tokens: 3, minPattern: 1 });
    expect(() => loadModelsFile(writeTemp("models:\n  - id: m\n    file: a.gguf\n    speculative: { method: draft }\n"))).toThrow(/speculative/);
  });

  it("reads memory sizes in bytes, decimal and binary units", () => {
    const budget = (raw: string) => {
      const r = parseCommandLine(["--memory-budget", raw], {});
      return r.kind === "run" ? r.options.memoryBudget : undefined;
    };
    expect(budget("800000000")).toBe(800_000_000);
    expect(budget("512MiB")).toBe(512 * 2 ** 20);
    expect(budget("4GiB")).toBe(4 * 2 ** 30);
    expect(budget("1.5GB")).toBe(1_500_000_000);
    const r = parseCommandLine([], { SPINDLE_MAX_LOADED_MODELS: "2", SPINDLE_VRAM_BUDGET: "8gib" });
    expect(r.kind === "run" && [r.options.maxLoadedModels, r.options.vramBudget, r.options.memoryBudget]).toEqual([2, 8 * 2 ** 30, undefined]);
  });

  it.each([
    [["--bogus"], /bogus/],
    [["--port", "http"], /--port: expected an integer/],
    [["--port", "70000"], /--port: must be between/],
    [["--gpu", "tpu"], /--gpu: expected one of/],
    [["--threads", "0"], /--threads/],
    [["--model", "a.gguf", "--model", "b/a.gguf"], /given twice/],
    [["--memory-budget", "lots"], /--memory-budget: expected a size such as/],
    [["--memory-budget", "4XB"], /--memory-budget: expected a size/],
    [["--max-loaded-models", "-1"], /--max-loaded-models/],
    [["--request-timeout", "3000000"], /--request-timeout: at most 2147483 seconds/],
  ])("refuses %j", (args, message) => {
    expect(() => parseCommandLine(args as string[], {})).toThrow(ConfigError);
    expect(() => parseCommandLine(args as string[], {})).toThrow(message);
  });
});

describe("one declaration of every option", () => {
  it("the README's option table is the declaration's (regenerate it with npm run docs:options)", () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const table = /<!-- options:start -->\n([\s\S]*?)\n<!-- options:end -->/.exec(readme)?.[1];
    expect(table).toBe(optionsTable());
  });

  it("--help names every declared flag and its environment variable, and nothing undeclared", () => {
    const help = helpText();
    for (const o of OPTIONS) {
      expect(help).toContain(`--${o.flag} ${o.arg}`);
      expect(help).toContain(`[${o.env}]`);
    }
    const flags = [...help.matchAll(/^ {2}--([a-z-]+)/gm)].map((m) => m[1]);
    expect(flags).toEqual([...OPTIONS.map((o) => o.flag), "help"]);
  });

  it("parsing nothing gives the declared defaults", () => {
    const r = parseCommandLine([], {});
    expect(r.kind === "run" && r.options).toEqual(defaultServerOptions());
  });

  it("every option is read from its environment variable", () => {
    const r = parseCommandLine([], { SPINDLE_KEY_TOKENS_PER_MINUTE: "300000", SPINDLE_REQUEST_TIMEOUT: "2.5", SPINDLE_PUBLIC: "health,metrics" });
    expect(r.kind === "run" && [r.options.keyTokensPerMinute, r.options.requestTimeoutSeconds, r.options.publicAreas]).toEqual([300000, 2.5, ["health", "metrics"]]);
  });
});

describe("the spindle process", () => {
  it("--help prints every option and exits 0", () => {
    const r = run(["--help"]);
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe(helpText());
  });

  it.each([
    ["an unknown option", ["--frobnicate"], /frobnicate/],
    ["a bad value", ["--parallel", "many"], /--parallel/],
    ["a missing model file", ["--model", "/nonexistent/model.gguf"], /not found/],
    ["an unloadable model file", ["--model", sharedModel("stories260K-ggufv1-unsupported.gguf")], /cannot load/],
    ["a draft model with another tokenizer", ["--model", sharedModel("stories260K.gguf"), "--model-draft", sharedModel("llama-2-tiny-random.gguf")], /^spindle: .*the draft model cannot draft for it: .*vocabulary/],
    ["a missing draft model", ["--model", sharedModel("stories260K.gguf"), "--model-draft", "/nonexistent/draft.gguf"], /draft.*not found/],
    ["a missing models file", ["--config", "/nonexistent/models.yaml"], /cannot read models file \/nonexistent\/models\.yaml: it does not exist \(pass --config FILE/],
    // No GPU here (CI machines have none): a backend asked for by name names what is missing.
    ...(existsSync("/dev/nvidia0") ? [] : [["--gpu cuda without a usable CUDA", ["--gpu", "cuda", "--model", sharedModel("stories260K.gguf")], /^spindle: --gpu cuda: the CUDA build (cannot load: .*not found \(|.*is not installed).*--gpu cpu/]]),
    ["a model directory without a .gguf", ["--model", mkdtempSync(join(tmpdir(), "spindle-cli-empty-"))], /^spindle: --model .*: a directory must hold exactly one \.gguf file; it holds none$/],
    ["--gpu metal off macOS", ["--gpu", "metal", "--model", sharedModel("stories260K.gguf")], /^spindle: --gpu metal: Metal runs on macOS only;.*--gpu cpu/],
  ])("%s: one line naming the problem, exit code 2, no stack trace", (_name, args, message) => {
    const r = run(args as string[]);
    expect(r.status).toBe(2);
    const lines = r.stderr.trim().split("\n").filter((l) => !l.includes("ExperimentalWarning") && !l.includes("--trace-warnings"));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(message as RegExp);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it("a model that can be neither found nor fetched: one line saying what failed, why, and what to do", () => {
    const dir = mkdtempSync(join(tmpdir(), "spindle-cli-"));
    const file = join(dir, "models.yaml");
    // Port 2 on loopback: nothing listens (connection refused), and nothing leaves the machine.
    writeFileSync(file, `models:\n  - id: m\n    versions:\n      - name: v1\n        file: cache/m.gguf\n        sha256: ${"a".repeat(64)}\n        sources: ["${join(dir, "nowhere.gguf")}", "http://user:pw@127.0.0.1:2/m.gguf?sig=xyz"]\n`);
    const r = run(["--config", file, "--port", "0"]);
    expect(r.status).toBe(2);
    const lines = r.stderr.trim().split("\n");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/could not fetch .*cache\/m\.gguf: .*nowhere\.gguf: not found; http:\/\/127\.0\.0\.1:2\/m\.gguf\?…: fetch failed \(ECONNREFUSED\)\. Put the file there \(sha256 a{64}\)/);
    expect(r.stderr).not.toMatch(/pw|sig=xyz/);
    // Said once: not also in the log.
    expect(r.stdout).not.toMatch(/could not fetch/);
  });

  it("`listening on` comes after the model is ready, on every start", async () => {
    for (let i = 0; i < 2; i++) {
      const p = startProcess(["--model", `${sharedModel("stories260K.gguf")}=tiny`, "--port", "0"], { SPINDLE_LOG_LEVEL: "info" });
      await p.url;
      const out = p.output();
      expect(out.indexOf("model tiny@unversioned ready")).toBeGreaterThan(-1);
      expect(out.indexOf("model tiny@unversioned ready")).toBeLessThan(out.indexOf("listening on"));
      expect(out).not.toMatch(/Server listening at/);
      p.child.kill("SIGTERM");
      expect(await p.exited).toBe(0);
    }
  });

  it("a models file error names the model and the field", () => {
    const dir = mkdtempSync(join(tmpdir(), "spindle-cli-"));
    const file = join(dir, "models.yaml");
    writeFileSync(file, "models:\n  - id: good\n    file: a.gguf\n  - id: broken\n    file: b.gguf\n    parallel: lots\n");
    const r = run(["--config", file]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/model "broken", field parallel/);
  });

  it("starts on --model with --port 0, prints its address and answers; SIGTERM exits 0", async () => {
    const p = startProcess(["--model", `${sharedModel("stories260K.gguf")}=tiny`, "--port", "0"], { SPINDLE_PARALLEL: "2", SPINDLE_LOG_LEVEL: "warn" });
    const url = await p.url;
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    const models = await (await fetch(`${url}/v1/models`)).json();
    expect(models.data[0]).toMatchObject({ id: "tiny", parallel: 2 });
    const res = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "tiny", prompt: "Once upon a time", max_tokens: 8, temperature: 0 }),
    });
    expect(res.status).toBe(200);
    p.child.kill("SIGTERM");
    expect(await p.exited).toBe(0);
  });

  it("--engine-build picks the llama.cpp binary, says which in the log and spindle_build_info, and refuses a local build that is not there", async () => {
    const buildInfo = async (url: string) => /spindle_build_info\{[^}]*engine_build="(\w+)",cpu_variant="([\w-]+)"\}/.exec(await (await fetch(`${url}/metrics`)).text());
    const pre = startProcess(["--model", `${sharedModel("stories260K.gguf")}=tiny`, "--port", "0", "--engine-build", "prebuilt"], { SPINDLE_LOG_LEVEL: "info" });
    const info = await buildInfo(await pre.url);
    expect(info?.[1]).toBe("prebuilt");
    expect(pre.output()).toMatch(/engine: node-llama-cpp 3\.21\.1, cpu, prebuilt binary, ggml CPU variant [\w-]+/);
    pre.child.kill("SIGTERM");
    expect(await pre.exited).toBe(0);
    // A local build exists only where `npm run engine:build` ran (never in CI): either it
    // serves from it, or the start fails in one line that says how to make one.
    const localBuilds = join(ROOT, "node_modules", "node-llama-cpp", "llama", "localBuilds");
    if (existsSync(localBuilds)) {
      const local = startProcess(["--model", `${sharedModel("stories260K.gguf")}=tiny`, "--port", "0", "--engine-build", "local"], { SPINDLE_LOG_LEVEL: "warn" });
      expect((await buildInfo(await local.url))?.[1]).toBe("local");
      local.child.kill("SIGTERM");
      expect(await local.exited).toBe(0);
    } else {
      const r = run(["--model", sharedModel("stories260K.gguf"), "--port", "0", "--engine-build", "local"]);
      expect(r.status).toBe(2);
      expect(r.stderr.trim().split("\n")).toHaveLength(1);
      expect(r.stderr).toContain("npm run engine:build");
    }
  });
});
