/**
 * The images and manifests, checked without a Docker daemon or a cluster (neither is
 * available where this runs): the Dockerfiles against the rules hadolint applies (it is
 * not in Debian) and this project's; the CUDA image against the CUDA libraries the
 * installed engine binary really links; every kustomization rendered by `kubectl
 * kustomize` and each object validated against the Kubernetes API schemas
 * (kubernetes-models; KServe and the inference extension by the fields their controllers
 * require); and the flags, probes, ports and metric names in the manifests against the
 * server's own option declarations and a live /metrics scrape.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createRequire } from "node:module";
import { parseAllDocuments, parse as parseYaml } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseCommandLine } from "../src/config/cli.js";
import { OPTIONS } from "../src/config/options.js";
import type { RunningServer } from "../src/server.js";
import { startTestServer, STORIES } from "./helpers/server.js";

const ROOT = resolve(import.meta.dirname, "..");
const read = (p: string) => readFileSync(join(ROOT, p), "utf8");
const pkg = JSON.parse(read("package.json")) as { version: string; license?: string };

// --- Dockerfiles --------------------------------------------------------------------

interface Instruction {
  op: string;
  args: string;
  line: number;
}
interface Stage {
  from: string;
  name: string | undefined;
  body: Instruction[];
}

/** Instructions (continuations joined, comments dropped), grouped by stage; ARGs before the first FROM kept apart. */
function parseDockerfile(text: string): { globalArgs: Record<string, string>; stages: Stage[] } {
  const instructions: Instruction[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (/^\s*(#|$)/.test(lines[i]!)) continue;
    const start = i;
    let joined = lines[i]!;
    while (joined.endsWith("\\") && i + 1 < lines.length) {
      joined = joined.slice(0, -1) + " " + lines[++i]!.trim();
    }
    const m = /^\s*([A-Za-z]+)\s+(.*)$/.exec(joined);
    if (!m) throw new Error(`line ${start + 1}: not an instruction: ${joined}`);
    instructions.push({ op: m[1]!.toUpperCase(), args: m[2]!.trim(), line: start + 1 });
  }
  const globalArgs: Record<string, string> = {};
  const stages: Stage[] = [];
  for (const ins of instructions) {
    if (ins.op === "FROM") {
      const m = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args)!;
      stages.push({ from: m[1]!, name: m[2], body: [] });
    } else if (stages.length === 0) {
      expect(ins.op, `line ${ins.line}: only ARG may come before the first FROM`).toBe("ARG");
      const [k, v = ""] = ins.args.split("=");
      globalArgs[k!] = v.replace(/^"|"$/g, "");
    } else stages.at(-1)!.body.push(ins);
  }
  return { globalArgs, stages };
}

const expand = (s: string, args: Record<string, string>) => s.replace(/\$\{(\w+)\}/g, (_, k: string) => args[k] ?? `\${${k}}`);

describe.each(["Dockerfile", "Dockerfile.cuda"])("%s", (file) => {
  const { globalArgs, stages } = parseDockerfile(read(file));
  const runtime = stages.at(-1)!;
  const all = (op: string) => stages.flatMap((s) => s.body.filter((i) => i.op === op));
  const last = (op: string) => runtime.body.filter((i) => i.op === op).at(-1);
  const env: Record<string, string> = {};
  for (const i of runtime.body.filter((i) => i.op === "ENV")) for (const m of i.args.matchAll(/(\w+)=("[^"]*"|\S+)/g)) env[m[1]!] = m[2]!.replace(/^"|"$/g, "");

  it("is multi-stage: compiled in a build stage, run from a runtime stage without the compiler's packages", () => {
    expect(stages.length).toBeGreaterThanOrEqual(3);
    expect(runtime.name).toBe("runtime");
    const build = stages.find((s) => s.name === "build")!;
    expect(build.body.some((i) => i.op === "RUN" && i.args.includes("npm run build"))).toBe(true);
    // The runtime's packages come from `npm ci --omit=dev`, its server from the build stage.
    const deps = stages.find((s) => s.name === "deps")!;
    expect(deps.body.some((i) => i.op === "RUN" && /npm ci --omit=dev/.test(i.args))).toBe(true);
    expect(runtime.body.some((i) => i.op === "COPY" && i.args.startsWith("--from=build /app/dist"))).toBe(true);
    expect(runtime.body.some((i) => i.op === "COPY" && i.args.startsWith("--from=deps /app/node_modules"))).toBe(true);
  });

  it("follows hadolint's rules: tagged bases (never latest), no ADD, npm ci only, apt without recommends and with its lists removed, exec-form commands, a shell with pipefail around pipes", () => {
    for (const s of stages) {
      const image = expand(s.from, globalArgs);
      if (stages.some((t) => t.name === image)) continue;
      expect(image, `FROM ${s.from}`).toMatch(/^[\w./-]+:[\w.-]+$/);
      expect(image).not.toMatch(/:latest$/);
    }
    expect(all("ADD")).toEqual([]);
    for (const r of all("RUN")) {
      expect(r.args, `line ${r.line}`).not.toMatch(/npm install\b|npm i\b/);
      expect(r.args, `line ${r.line}`).not.toMatch(/\bsudo\b|apt-get upgrade|\bcd /);
      if (/apt-get install/.test(r.args)) {
        expect(r.args).toMatch(/apt-get install -y --no-install-recommends/);
        expect(r.args).toMatch(/rm -rf \/var\/lib\/apt\/lists\/\*/);
      }
      if (/\|/.test(r.args.replace(/\|\|/g, ""))) expect(runtime.body.concat(stages.flatMap((s) => s.body)).some((i) => i.op === "SHELL" && /pipefail/.test(i.args))).toBe(true);
    }
    for (const op of ["CMD", "ENTRYPOINT"]) for (const i of all(op)) expect(() => JSON.parse(i.args), `${op} on line ${i.line} in exec form`).not.toThrow();
    expect(all("CMD").length + all("ENTRYPOINT").length).toBeGreaterThan(0);
    // WORKDIR, not cd; one ENTRYPOINT at most.
    expect(runtime.body.filter((i) => i.op === "ENTRYPOINT").length).toBeLessThanOrEqual(1);
  });

  it("runs as a numeric non-root user, with a HEALTHCHECK on /livez, STOPSIGNAL SIGTERM and the OCI labels", () => {
    const user = last("USER")!.args;
    expect(user).toMatch(/^\d+(:\d+)?$/);
    expect(Number(user.split(":")[0])).toBeGreaterThan(0);
    // The last USER comes after every RUN: nothing runs as root once it is set.
    const userAt = runtime.body.indexOf(last("USER")!);
    expect(runtime.body.slice(userAt).some((i) => i.op === "RUN")).toBe(false);
    expect(last("HEALTHCHECK")!.args).toMatch(/\/livez/);
    expect(last("STOPSIGNAL")!.args).toBe("SIGTERM");
    const labels = runtime.body.filter((i) => i.op === "LABEL").map((i) => i.args).join(" ");
    for (const l of ["version", "source", "licenses", "title", "description"]) expect(labels).toContain(`org.opencontainers.image.${l}=`);
    expect(labels).toContain(`org.opencontainers.image.licenses="${pkg.license}"`);
    const versionArg = runtime.body.find((i) => i.op === "ARG" && i.args.startsWith("VERSION="))!;
    expect(versionArg.args).toBe(`VERSION=${pkg.version}`);
  });

  it("the port it exposes, its entrypoint and its environment are the server's own", () => {
    expect(last("EXPOSE")!.args).toBe(env.SPINDLE_PORT);
    const entry = JSON.parse(last("ENTRYPOINT")!.args) as string[];
    expect(entry).toEqual(["node", "dist/launch.cjs"]);
    expect(existsSync(join(ROOT, "src", "launch.cts"))).toBe(true);
    // Every SPINDLE_ variable it sets is a declared option's, and they parse.
    const declared = new Set(OPTIONS.map((o) => o.env));
    for (const k of Object.keys(env).filter((k) => k.startsWith("SPINDLE_"))) expect(declared.has(k), k).toBe(true);
    const parsed = parseCommandLine([], Object.fromEntries(Object.entries(env).filter(([k]) => k.startsWith("SPINDLE_"))));
    expect(parsed.kind).toBe("run");
    // Writable state lives on the volume: the root filesystem may be read-only.
    const volume = JSON.parse(last("VOLUME")!.args) as string[];
    expect(volume.some((v) => env.SPINDLE_STATE_FILE!.startsWith(`${v}/`))).toBe(true);
  });

  it("copies only what exists and what .dockerignore lets into the context", () => {
    const ignore = read(".dockerignore").split("\n").map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"));
    for (const must of ["**/node_modules", ".bench", ".git", "dist", "models"]) expect(ignore).toContain(must);
    for (const c of all("COPY").filter((i) => !i.args.startsWith("--from="))) {
      const parts = c.args.split(/\s+/);
      for (const src of parts.slice(0, -1)) {
        expect(existsSync(join(ROOT, src)), `COPY ${src}`).toBe(true);
        expect(ignore.some((p) => p === src || p === src.split("/")[0]), `COPY ${src} is excluded by .dockerignore`).toBe(false);
      }
    }
  });
});

describe("engine binaries in the images", () => {
  it("prune-engine-binaries keeps this platform's CPU build and the backends asked for, and removes the rest", () => {
    const dir = mkdtempSync(join(tmpdir(), "spindle-prune-"));
    const platform = { linux: "linux", darwin: "mac", win32: "win" }[process.platform as string] ?? process.platform;
    const base = `${platform}-${process.arch}`;
    const names = [base, `${base}-cuda`, `${base}-cuda-ext`, `${base}-vulkan`, "linux-armv7l", "mac-arm64-metal", "win-x64"];
    for (const n of names) mkdirSync(join(dir, "@node-llama-cpp", n), { recursive: true });
    const run = (...args: string[]) => execFileSync(process.execPath, [join(ROOT, "scripts/prune-engine-binaries.mjs"), "--dir", dir, ...args], { encoding: "utf8" });
    const left = () => readdirSync(join(dir, "@node-llama-cpp")).sort();
    run("--keep", "cuda");
    expect(left()).toEqual([base, `${base}-cuda`].sort());
    run();
    expect(left()).toEqual([base]);
    // And the two Dockerfiles ask for what they say.
    expect(read("Dockerfile")).toMatch(/node scripts\/prune-engine-binaries\.mjs \\/);
    expect(read("Dockerfile.cuda")).toMatch(/node scripts\/prune-engine-binaries\.mjs --keep cuda/);
  });

  it("the CUDA image carries the CUDA major the engine's CUDA build links (libcudart, libcublas)", () => {
    let cudaPkg: string;
    try {
      cudaPkg = dirname(createRequire(join(ROOT, "package.json")).resolve("@node-llama-cpp/linux-x64-cuda"));
    } catch {
      return expect.soft(process.platform === "linux" && process.arch === "x64", "the linux-x64-cuda package is installed here").toBe(false);
    }
    while (!existsSync(join(cudaPkg, "package.json"))) cudaPkg = dirname(cudaPkg);
    const lib = join(cudaPkg, "bins", "linux-x64-cuda", "libggml-cuda.so");
    const readelf = spawnSync("readelf", ["-d", lib], { encoding: "utf8" });
    if (readelf.error) throw new Error("readelf is missing: .ci/run installs Debian's binutils");
    const needed = [...readelf.stdout.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]!);
    const cudart = needed.find((n) => n.startsWith("libcudart.so."))!;
    const cublas = needed.find((n) => n.startsWith("libcublas.so."))!;
    expect(cudart).toBeDefined();
    const major = cudart.split(".").pop()!;
    expect(cublas).toBe(`libcublas.so.${major}`);
    const { globalArgs } = parseDockerfile(read("Dockerfile.cuda"));
    expect(globalArgs.CUDA_VERSION!.split(".")[0]).toBe(major);
    const [maj, min] = globalArgs.CUDA_VERSION!.split(".");
    expect(globalArgs.CUDA_MAJOR_MINOR).toBe(`${maj}-${min}`);
    // NVIDIA's base image brings cudart; the image installs cuBLAS of the same CUDA.
    expect(read("Dockerfile.cuda")).toMatch(/FROM nvidia\/cuda:\$\{CUDA_VERSION\}-base-/);
    expect(read("Dockerfile.cuda")).toMatch(/apt-get install -y --no-install-recommends "libcublas-\$\{CUDA_MAJOR_MINOR\}"/);
  });
});

// --- Kubernetes ---------------------------------------------------------------------

type K8sObject = { apiVersion: string; kind: string; metadata: { name: string; labels?: Record<string, string>; annotations?: Record<string, string> }; spec?: Record<string, unknown> } & Record<string, unknown>;

function kustomize(dir: string): K8sObject[] {
  const r = spawnSync("kubectl", ["kustomize", join(ROOT, dir)], { encoding: "utf8" });
  if (r.error) throw new Error("kubectl is missing: .ci/run installs Debian's kubectl");
  expect(r.status, r.stderr).toBe(0);
  return parseAllDocuments(r.stdout).map((d) => d.toJS() as K8sObject);
}

/** The Kubernetes API schema of each kind these manifests use (kubernetes-models and its CRD packages). */
const MODELS: Record<string, () => Promise<{ validate(): void } & (new (o: unknown) => { validate(): void })>> = {
  "v1/ConfigMap": async () => (await import("kubernetes-models/v1")).ConfigMap as never,
  "v1/Service": async () => (await import("kubernetes-models/v1")).Service as never,
  "v1/ServiceAccount": async () => (await import("kubernetes-models/v1")).ServiceAccount as never,
  "v1/PersistentVolumeClaim": async () => (await import("kubernetes-models/v1")).PersistentVolumeClaim as never,
  "v1/Pod": async () => (await import("kubernetes-models/v1")).Pod as never,
  "apps/v1/Deployment": async () => (await import("kubernetes-models/apps/v1")).Deployment as never,
  "policy/v1/PodDisruptionBudget": async () => (await import("kubernetes-models/policy/v1")).PodDisruptionBudget as never,
  "networking.k8s.io/v1/NetworkPolicy": async () => (await import("kubernetes-models/networking.k8s.io/v1")).NetworkPolicy as never,
  "autoscaling/v2/HorizontalPodAutoscaler": async () => (await import("kubernetes-models/autoscaling/v2")).HorizontalPodAutoscaler as never,
  "rbac.authorization.k8s.io/v1/Role": async () => (await import("kubernetes-models/rbac.authorization.k8s.io/v1")).Role as never,
  "rbac.authorization.k8s.io/v1/RoleBinding": async () => (await import("kubernetes-models/rbac.authorization.k8s.io/v1")).RoleBinding as never,
  "keda.sh/v1alpha1/ScaledObject": async () => (await import("@kubernetes-models/keda/keda.sh/v1alpha1")).ScaledObject as never,
  "monitoring.coreos.com/v1/ServiceMonitor": async () => (await import("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1")).ServiceMonitor as never,
  "gateway.networking.k8s.io/v1/Gateway": async () => (await import("@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1")).Gateway as never,
  "gateway.networking.k8s.io/v1/HTTPRoute": async () => (await import("@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1")).HTTPRoute as never,
};

/** KServe's and the inference extension's kinds: the fields their controllers require, and their containers as Pod containers. */
const CRD_CHECKS: Record<string, (o: K8sObject) => Promise<void>> = {
  "serving.kserve.io/v1alpha1/ServingRuntime": async (o) => {
    const spec = o.spec as { supportedModelFormats: Array<{ name: string }>; containers: Array<{ name: string }> };
    expect(spec.supportedModelFormats.length).toBeGreaterThan(0);
    for (const f of spec.supportedModelFormats) expect(f.name).toMatch(/^[a-z0-9-]+$/);
    // KServe finds the model server by this container name.
    expect(spec.containers[0]!.name).toBe("kserve-container");
    await validate({ apiVersion: "v1", kind: "Pod", metadata: { name: o.metadata.name }, spec: { containers: spec.containers } } as K8sObject);
  },
  "serving.kserve.io/v1beta1/InferenceService": async (o) => {
    const p = (o.spec as { predictor: { model: { modelFormat: { name: string }; runtime?: string; storageUri: string }; canaryTrafficPercent?: number } }).predictor;
    expect(p.model.modelFormat.name).toBeTruthy();
    expect(p.model.storageUri).toMatch(/^(pvc|s3|gs|hf|https?|oci):\/\//);
    expect(o.metadata.name).toMatch(/^[a-z]([-a-z0-9]*[a-z0-9])?$/);
    if (p.canaryTrafficPercent !== undefined) {
      expect(p.canaryTrafficPercent).toBeGreaterThanOrEqual(0);
      expect(p.canaryTrafficPercent).toBeLessThanOrEqual(100);
      // KServe's canary splits traffic between Knative revisions: Serverless mode only.
      expect(o.metadata.annotations?.["serving.kserve.io/deploymentMode"]).toBe("Serverless");
    }
  },
  "inference.networking.k8s.io/v1/InferencePool": async (o) => {
    const s = o.spec as { selector: { matchLabels: Record<string, string> }; targetPorts: Array<{ number: number }>; endpointPickerRef: { name: string; port: { number: number }; failureMode?: string } };
    expect(Object.keys(s.selector.matchLabels).length).toBeGreaterThan(0);
    expect(s.targetPorts.length).toBeGreaterThan(0);
    expect(s.targetPorts.length).toBeLessThanOrEqual(8);
    for (const p of s.targetPorts) expect(Number.isInteger(p.number) && p.number > 0 && p.number < 65536).toBe(true);
    expect(s.endpointPickerRef.name).toBeTruthy();
    expect(s.endpointPickerRef.port.number).toBeGreaterThan(0);
    if (s.endpointPickerRef.failureMode) expect(["FailOpen", "FailClose"]).toContain(s.endpointPickerRef.failureMode);
  },
};

async function validate(o: K8sObject): Promise<void> {
  const key = `${o.apiVersion}/${o.kind}`;
  const crd = CRD_CHECKS[key];
  if (crd) return crd(o);
  const Model = MODELS[key];
  if (!Model) throw new Error(`no schema for ${key}: add it to MODELS`);
  const Ctor = await Model();
  expect(() => new Ctor(o).validate(), `${key} ${o.metadata.name}`).not.toThrow();
}

const KUSTOMIZATIONS = ["deploy/overlays/cpu", "deploy/overlays/cuda", "deploy/overlays/cpu-hpa", "deploy/kserve/raw", "deploy/kserve/serverless-canary", "deploy/gateway"];

type Container = {
  name: string;
  args?: string[];
  env?: Array<{ name: string; value?: string }>;
  ports?: Array<{ name?: string; containerPort: number }>;
  startupProbe?: { httpGet: { path: string; port: string | number }; periodSeconds: number; failureThreshold: number };
  readinessProbe?: { httpGet?: { path: string; port: string | number } };
  livenessProbe?: { httpGet?: { path: string; port: string | number } };
  lifecycle?: { preStop?: { exec?: { command: string[] } } };
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
  securityContext?: { allowPrivilegeEscalation?: boolean; readOnlyRootFilesystem?: boolean; capabilities?: { drop?: string[] }; runAsNonRoot?: boolean; runAsUser?: number };
  volumeMounts?: Array<{ mountPath: string }>;
};
type PodSpec = { containers: Container[]; terminationGracePeriodSeconds?: number; securityContext?: { runAsNonRoot?: boolean; runAsUser?: number } };

const bytes = (q: string) => {
  const m = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T|KiB|MiB|GiB)?$/.exec(q)!;
  const unit = (m[2] ?? "").replace(/B$/, "");
  const mult: Record<string, number> = { "": 1, K: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40 };
  return Number(m[1]) * mult[unit]!;
};
const flagValue = (args: string[], flag: string) => args.find((a) => a.startsWith(`--${flag}=`))?.slice(flag.length + 3);

describe("Kubernetes manifests", () => {
  let server: RunningServer;
  let scraped: Set<string>;
  const rendered = new Map<string, K8sObject[]>();
  beforeAll(async () => {
    for (const k of KUSTOMIZATIONS) rendered.set(k, kustomize(k));
    // The server as the manifests run it: metrics public, keys on.
    server = await startTestServer([STORIES], { apiKeys: ["deploy-test-key-1"], publicAreas: ["health", "metrics"] });
    const text = await (await fetch(`${server.url}/metrics`)).text();
    scraped = new Set([...text.matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]!));
  });
  afterAll(async () => server?.close());

  it.each(KUSTOMIZATIONS)("%s renders, and every object validates against its API schema", async (k) => {
    const objs = rendered.get(k)!;
    expect(objs.length).toBeGreaterThan(1);
    for (const o of objs) await validate(o);
  });

  const spindlePods = (): Array<[string, PodSpec, K8sObject]> =>
    [...rendered.entries()].flatMap(([k, objs]) =>
      objs.filter((o) => o.kind === "Deployment" && o.metadata.name === "spindle").map((o) => [k, (o.spec as { template: { spec: PodSpec } }).template.spec, o] as [string, PodSpec, K8sObject]),
    );

  it("the Deployment's flags are the server's: declared options that parse, probes on routes that answer, the port it listens on", async () => {
    const pods = spindlePods();
    expect(pods.map(([k]) => k).sort()).toEqual(["deploy/overlays/cpu", "deploy/overlays/cpu-hpa", "deploy/overlays/cuda"]);
    const declared = new Set(OPTIONS.map((o) => o.flag));
    for (const [k, pod] of pods) {
      const c = pod.containers[0]!;
      for (const a of c.args!) expect(declared.has(a.replace(/^--/, "").split("=")[0]!), `${k}: ${a}`).toBe(true);
      const env = Object.fromEntries((c.env ?? []).map((e) => [e.name, e.value ?? "from-a-secret-0000"]));
      const parsed = parseCommandLine(c.args!, env);
      expect(parsed.kind).toBe("run");
      if (parsed.kind !== "run") continue;
      // The image listens on 8080 (its SPINDLE_PORT); the container port says so.
      expect(c.ports![0]!.containerPort).toBe(8080);
      for (const probe of [c.startupProbe!, c.readinessProbe!, c.livenessProbe!]) {
        expect(probe.httpGet!.port).toBe(c.ports![0]!.name);
        const res = await fetch(`${server.url}${probe.httpGet!.path}`);
        expect(res.status, `${k}: ${probe.httpGet!.path}`).toBe(200);
      }
      expect(c.startupProbe!.httpGet.path).toBe("/readyz");
      expect(c.livenessProbe!.httpGet!.path).toBe("/livez");
      // Start-up may fetch, load and warm: at least 10 minutes before the kubelet gives up.
      expect(c.startupProbe!.periodSeconds * c.startupProbe!.failureThreshold).toBeGreaterThanOrEqual(600);
      // Draining: grace > --shutdown-grace + the preStop delay.
      const preStop = Number(c.lifecycle!.preStop!.exec!.command.at(-1));
      expect(pod.terminationGracePeriodSeconds!).toBeGreaterThan(parsed.options.shutdownGraceSeconds + preStop);
      // The memory budget fits the container's memory limit with room for the runtime.
      const limit = bytes(c.resources!.limits!.memory!);
      expect(bytes(flagValue(c.args!, "memory-budget")!)).toBeLessThanOrEqual(0.8 * limit);
      expect(c.resources!.requests!.memory).toBe(c.resources!.limits!.memory);
      // Files it reads and writes are on mounts: the root filesystem is read-only.
      const mounts = (c.volumeMounts ?? []).map((m) => m.mountPath);
      for (const f of [parsed.options.configFile, parsed.options.stateFile!, parsed.options.apiKeysFile!]) {
        expect(mounts.some((m) => f === m || f.startsWith(`${m}/`)), `${k}: ${f} is on a volume`).toBe(true);
      }
      if (k.endsWith("cuda")) {
        expect(parsed.options.gpu).toBe("cuda");
        expect(c.resources!.limits!["nvidia.com/gpu"]).toBe("1");
      }
    }
  });

  it("pods run as the image's non-root user, without privilege escalation, on a read-only root, with every capability dropped", () => {
    const uid = Number(parseDockerfile(read("Dockerfile")).stages.at(-1)!.body.filter((i) => i.op === "USER").at(-1)!.args.split(":")[0]);
    const runtimes = [...rendered.values()].flat().filter((o) => o.kind === "ServingRuntime");
    const pods = [...spindlePods().map(([, p]) => p), ...runtimes.map((r) => r.spec as unknown as PodSpec)];
    for (const pod of pods) {
      const c = pod.containers[0]!;
      const nonRoot = pod.securityContext?.runAsNonRoot ?? c.securityContext?.runAsNonRoot;
      expect(nonRoot).toBe(true);
      expect(pod.securityContext?.runAsUser ?? c.securityContext?.runAsUser).toBe(uid);
      expect(c.securityContext).toMatchObject({ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ["ALL"] } });
    }
  });

  it("selectors select: the Service, PodDisruptionBudget, NetworkPolicy, ServiceMonitor and InferencePool pick the Spindle pods", () => {
    const objs = rendered.get("deploy/overlays/cpu")!;
    const podLabels = (objs.find((o) => o.kind === "Deployment")!.spec as { template: { metadata: { labels: Record<string, string> } } }).template.metadata.labels;
    const matches = (sel: Record<string, string>) => Object.entries(sel).every(([k, v]) => podLabels[k] === v);
    const by = (kind: string) => objs.find((o) => o.kind === kind)!.spec as Record<string, { matchLabels?: Record<string, string> } & Record<string, string>>;
    expect(matches(by("Service").selector as Record<string, string>)).toBe(true);
    expect(matches(by("PodDisruptionBudget").selector!.matchLabels!)).toBe(true);
    expect(matches(by("NetworkPolicy").podSelector!.matchLabels!)).toBe(true);
    const sm = objs.find((o) => o.kind === "ServiceMonitor")!;
    const svc = objs.find((o) => o.kind === "Service")!;
    expect(Object.entries((sm.spec as { selector: { matchLabels: Record<string, string> } }).selector.matchLabels).every(([k, v]) => svc.metadata.labels![k] === v)).toBe(true);
    const pool = rendered.get("deploy/gateway")!.find((o) => o.kind === "InferencePool")!;
    expect(matches((pool.spec as { selector: { matchLabels: Record<string, string> } }).selector.matchLabels)).toBe(true);
    expect((pool.spec as { targetPorts: Array<{ number: number }> }).targetPorts[0]!.number).toBe(8080);
    // The ServiceMonitor scrapes the path the server serves its metrics on.
    expect((sm.spec as { endpoints: Array<{ path: string }> }).endpoints[0]!.path).toBe("/metrics");
  });

  it("every metric the autoscalers and the endpoint picker read is one the server exports (a live scrape)", () => {
    const referenced = new Map<string, string>();
    const note = (where: string, text: string) => {
      for (const m of text.matchAll(/spindle_[a-z_]+/g)) referenced.set(m[0], where);
    };
    for (const [k, objs] of rendered) {
      for (const o of objs) {
        if (o.kind === "ScaledObject") note(`${k} ScaledObject`, JSON.stringify((o.spec as { triggers: unknown }).triggers));
        if (o.kind === "HorizontalPodAutoscaler") note(`${k} HPA`, JSON.stringify((o.spec as { metrics: unknown }).metrics));
        if (o.kind === "Deployment" && o.metadata.name === "spindle-epp") note(`${k} EPP`, JSON.stringify(((o.spec as { template: { spec: PodSpec } }).template.spec.containers[0]!.args)));
      }
    }
    note("prometheus-adapter rule", read("deploy/components/hpa/prometheus-adapter-rule.yaml"));
    expect([...referenced.keys()].sort()).toEqual(["spindle_process_kv_cache_usage_ratio", "spindle_process_requests_running", "spindle_process_requests_waiting", "spindle_requests_waiting"]);
    for (const [name, where] of referenced) expect(scraped.has(name), `${name} (${where})`).toBe(true);
    // The adapter rule is the YAML its config takes.
    expect(Array.isArray(parseYaml(read("deploy/components/hpa/prometheus-adapter-rule.yaml")))).toBe(true);
    // The picker's flags are those of the release it targets.
    const epp = rendered.get("deploy/gateway")!.find((o) => o.metadata.name === "spindle-epp" && o.kind === "Deployment")!;
    const c = (epp.spec as { template: { spec: PodSpec } }).template.spec.containers[0]!;
    expect(c).toMatchObject({ image: "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.1" });
    const flags = c.args!.map((a) => a.split("=")[0]);
    expect(flags).toEqual(expect.arrayContaining(["--pool-name", "--total-queued-requests-metric", "--total-running-requests-metric", "--kv-cache-usage-percentage-metric", "--config-file"]));
  });

  it("the KServe runtime starts the server as KServe leaves the model: a directory holding one .gguf, served under the service's name", async () => {
    const runtime = rendered.get("deploy/kserve/raw")!.find((o) => o.kind === "ServingRuntime")!;
    const isvc = rendered.get("deploy/kserve/raw")!.find((o) => o.kind === "InferenceService")!;
    const c = (runtime.spec as unknown as PodSpec).containers[0]!;
    expect((isvc.spec as { predictor: { model: { runtime: string; modelFormat: { name: string } } } }).predictor.model.runtime).toBe(runtime.metadata.name);
    // {{.Name}} is KServe's template for the InferenceService's name.
    const dir = mkdtempSync(join(tmpdir(), "spindle-kserve-"));
    cpSync(join(ROOT, "..", "shared", "models", "stories260K.gguf"), join(dir, "model.gguf"));
    const args = c.args!.map((a) => a.replace("{{.Name}}", isvc.metadata.name).replace("/mnt/models", dir).replace(/^--port=\d+$/, "--port=0").replace("--host=0.0.0.0", "--host=127.0.0.1"));
    expect(parseCommandLine(args, {}).kind).toBe("run");
    const child = spawn(process.execPath, [join(ROOT, "dist", "launch.cjs"), ...args, "--gpu=cpu", "--log-level=silent"], { stdio: ["ignore", "pipe", "pipe"] });
    try {
      const url = await new Promise<string>((res, rej) => {
        let out = "";
        child.stdout.on("data", (d: Buffer) => {
          out += d.toString();
          const m = /^listening on (\S+)$/m.exec(out);
          if (m) res(m[1]!);
        });
        child.on("exit", (code) => rej(new Error(`exited ${code}`)));
      });
      const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: Array<{ id: string }> };
      expect(models.data.map((m) => m.id)).toEqual([isvc.metadata.name]);
      expect((await fetch(`${url}/v2/models/${isvc.metadata.name}/ready`)).status).toBe(200);
    } finally {
      child.kill("SIGTERM");
    }
    // Probes: KServe's Open Inference Protocol routes, answered by the server.
    for (const probe of [c.readinessProbe!, c.livenessProbe!]) expect((await fetch(`${server.url}${probe.httpGet!.path}`)).status).toBe(200);
    expect(c.ports![0]!.containerPort).toBe(Number(flagValue(c.args!, "port")));
  });
});
