/**
 * Prometheus metrics (prom-client, own registry). Names follow Prometheus conventions:
 * `spindle_` prefix, base units in the name, `_total` on counters. Labels are bounded:
 * model ids come from the configuration (an unknown name is "_unknown"), never from a
 * client's free text; no request ids.
 *
 * Per-token work is one observe() on a child histogram bound once per model; gauges are
 * computed at scrape time from the live objects, never maintained on the hot path.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { EvictionReason, RequestRecord, ResidencySnapshot, SchedulerObserver, VersionSnapshot } from "../observers.js";
import { HotHistogram } from "./hot-histogram.js";

export const SPINDLE_VERSION = "0.1.0";

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
const ITL_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1];
const TOKEN_BUCKETS = [1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
const STEP_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048];

const UNKNOWN = "_unknown";

export class Metrics {
  readonly registry = new Registry();
  private readonly requests: Counter;
  private readonly errors: Counter;
  private readonly duration: Histogram;
  private readonly queueWait: Histogram;
  private readonly ttft: Histogram;
  private readonly itl: HotHistogram;
  private readonly promptTokensPerRequest: Histogram;
  private readonly completionTokensPerRequest: Histogram;
  private readonly stepSequences: HotHistogram;
  private readonly stepTokens: HotHistogram;
  private readonly promptTokens: Counter;
  private readonly cachedTokens: Counter;
  private readonly completionTokens: Counter;
  private readonly loads: Counter;
  private readonly loadFailures: Counter;
  private readonly loadDuration: Histogram;
  private readonly warmupDuration: Histogram;
  private readonly evictions: Counter;
  private readonly shadows: Counter;
  private readonly repositoryChanges: Counter;
  private readonly keyRequests: Counter;
  private readonly keyTokens: Counter;

  /** Off (--metrics off): nothing is recorded and /metrics answers 404. */
  constructor(backend: string, nodeLlamaCppVersion: string, readonly enabled = true, engineBuild: { type: string; cpuVariant: string } = { type: "prebuilt", cpuVariant: "unknown" }) {
    const registers = [this.registry];
    // prom-client's default process metrics include gauges named *_total, which
    // `promtool check metrics` rejects; these are the ones an operator needs.
    new Gauge({
      name: "spindle_process_resident_memory_bytes",
      help: "Resident set size of the server process.",
      registers,
      collect() {
        this.set(process.memoryUsage.rss());
      },
    });
    new Gauge({
      name: "spindle_process_heap_used_bytes",
      help: "V8 heap in use.",
      registers,
      collect() {
        this.set(process.memoryUsage().heapUsed);
      },
    });
    new Gauge({ name: "spindle_process_start_time_seconds", help: "Start time of the process, in Unix seconds.", registers }).set(
      Math.round(performance.timeOrigin / 1000),
    );
    const mv = ["model", "version"];
    this.requests = new Counter({
      name: "spindle_requests_total",
      help: "Finished generation requests.",
      labelNames: ["endpoint", ...mv, "status_class", "finish_reason"],
      registers,
    });
    this.errors = new Counter({ name: "spindle_errors_total", help: "Failed requests by error type.", labelNames: ["endpoint", ...mv, "type"], registers });
    this.duration = new Histogram({ name: "spindle_request_duration_seconds", help: "End-to-end request latency, queue included.", labelNames: ["endpoint", ...mv], buckets: LATENCY_BUCKETS, registers });
    this.queueWait = new Histogram({ name: "spindle_queue_wait_seconds", help: "Time from admission to getting a slot.", labelNames: mv, buckets: LATENCY_BUCKETS, registers });
    this.ttft = new Histogram({ name: "spindle_time_to_first_token_seconds", help: "Time from arrival to the first generated token.", labelNames: mv, buckets: LATENCY_BUCKETS, registers });
    // Observed per token and per step: the allocation-free kind.
    this.itl = new HotHistogram("spindle_inter_token_latency_seconds", "Time between consecutive tokens of one sequence.", ITL_BUCKETS, this.registry);
    this.promptTokensPerRequest = new Histogram({ name: "spindle_request_prompt_tokens", help: "Prompt tokens per request.", labelNames: mv, buckets: TOKEN_BUCKETS, registers });
    this.completionTokensPerRequest = new Histogram({ name: "spindle_request_completion_tokens", help: "Completion tokens per request.", labelNames: mv, buckets: TOKEN_BUCKETS, registers });
    this.stepSequences = new HotHistogram("spindle_decode_step_sequences", "Sequences carried by each decode step (batch fullness).", STEP_BUCKETS, this.registry);
    this.stepTokens = new HotHistogram("spindle_decode_step_tokens", "Tokens evaluated by each decode step.", STEP_BUCKETS, this.registry);
    this.promptTokens = new Counter({ name: "spindle_prompt_tokens_total", help: "Prompt tokens of finished requests.", labelNames: mv, registers });
    this.cachedTokens = new Counter({ name: "spindle_cached_prompt_tokens_total", help: "Prompt tokens whose KV was reused.", labelNames: mv, registers });
    this.completionTokens = new Counter({ name: "spindle_completion_tokens_total", help: "Generated tokens.", labelNames: mv, registers });
    this.loads = new Counter({ name: "spindle_model_loads_total", help: "Model loads that completed (loaded and warmed).", labelNames: mv, registers });
    this.loadFailures = new Counter({ name: "spindle_model_load_failures_total", help: "Model loads that failed.", labelNames: mv, registers });
    this.loadDuration = new Histogram({ name: "spindle_model_load_duration_seconds", help: "Time to load a model and create its context.", labelNames: mv, buckets: LATENCY_BUCKETS, registers });
    this.warmupDuration = new Histogram({ name: "spindle_model_warmup_duration_seconds", help: "Time of the warm-up generation after load.", labelNames: mv, buckets: LATENCY_BUCKETS, registers });
    this.evictions = new Counter({ name: "spindle_model_evictions_total", help: "Model versions unloaded: reason lru (to make room) or admin.", labelNames: [...mv, "reason"], registers });
    this.shadows = new Counter({
      name: "spindle_shadow_requests_total",
      help: "Mirrored (shadow) requests by outcome; their output never reaches a client.",
      labelNames: [...mv, "outcome"],
      registers,
    });
    // Per tenant: the key's configured name (never the key); bounded by the keys configured.
    this.keyRequests = new Counter({ name: "spindle_key_requests_total", help: "Finished requests per API key (its configured name).", labelNames: ["key", "status_class"], registers });
    this.keyTokens = new Counter({ name: "spindle_key_tokens_total", help: "Prompt and completion tokens per API key (its configured name).", labelNames: ["key", "kind"], registers });
    this.repositoryChanges = new Counter({ name: "spindle_repository_changes_total", help: "Operator changes: promote, rollback, canary, shadow.", labelNames: ["name", "action"], registers });
    new Gauge({
      name: "spindle_build_info",
      help: "Build information; the value is always 1.",
      labelNames: ["version", "node_llama_cpp_version", "backend", "engine_build", "cpu_variant"],
      registers,
    }).set({ version: SPINDLE_VERSION, node_llama_cpp_version: nodeLlamaCppVersion, backend, engine_build: engineBuild.type, cpu_variant: engineBuild.cpuVariant }, 1);
  }

  private read: (() => ResidencySnapshot) | undefined;
  private scraping: ResidencySnapshot | undefined;

  /** The exposition text; the models' gauges all read one snapshot taken now. */
  async scrape(): Promise<{ contentType: string; body: string }> {
    this.scraping = this.read?.();
    try {
      return { contentType: this.registry.contentType, body: await this.registry.metrics() };
    } finally {
      this.scraping = undefined;
    }
  }

  /** Gauges read from a snapshot of the models at scrape time. */
  watch(read: () => ResidencySnapshot): void {
    const registers = [this.registry];
    const gauge = (name: string, help: string, read: (set: (labels: Record<string, string>, v: number) => void) => void, extra: string[] = []) =>
      new Gauge({
        name,
        help,
        labelNames: ["model", "version", ...extra],
        registers,
        collect() {
          this.reset();
          read((labels, v) => this.set(labels, v));
        },
      });
    this.read = read;
    // One snapshot per scrape (see scrape()), shared by every gauge collected in it.
    const snapshot = () => this.scraping ?? read();
    const each = (fn: (v: VersionSnapshot, labels: { model: string; version: string }) => void) => {
      for (const v of snapshot().versions) fn(v, { model: v.id, version: v.version });
    };
    const loaded = (fn: (l: NonNullable<VersionSnapshot["loaded"]>, labels: { model: string; version: string }) => void) =>
      each((v, labels) => v.loaded && fn(v.loaded, labels));
    gauge("spindle_requests_running", "Requests holding a slot.", (set) => loaded((l, labels) => set(labels, l.scheduler.busySlots)));
    gauge("spindle_requests_waiting", "Requests waiting for a slot.", (set) => loaded((l, labels) => set(labels, l.scheduler.waiting)));
    gauge("spindle_queued_prompt_tokens", "Prompt tokens of the waiting requests.", (set) => loaded((l, labels) => set(labels, l.scheduler.waitingTokens)));
    gauge("spindle_slots_busy", "Slots (sequences) in use.", (set) => loaded((l, labels) => set(labels, l.scheduler.busySlots)));
    gauge("spindle_slots", "Slots (sequences) of the model's context.", (set) => loaded((l, labels) => set(labels, l.scheduler.totalSlots)));
    gauge("spindle_kv_cache_reserved_bytes", "KV cache reserved by the context.", (set) =>
      loaded((l, labels) => set(labels, l.kvBytesPerToken * l.kvCells)),
    );
    gauge("spindle_kv_cache_used_bytes", "KV cache holding tokens now.", (set) => loaded((l, labels) => set(labels, l.kvBytesPerToken * l.scheduler.heldTokens)));
    // What gateway endpoint pickers read as KV utilisation (vLLM's kv_cache_usage_perc, 0-1):
    // cells held for running requests; cells idle slots keep for prefix reuse count as free.
    gauge("spindle_kv_cache_usage_ratio", "KV cache cells holding tokens of running requests, divided by all cells (0-1).", (set) =>
      loaded((l, labels) => set(labels, l.kvCells > 0 ? l.scheduler.runningTokens / l.kvCells : 0)),
    );
    // Speculative decoding: predicted tokens evaluated ahead, and those the model confirmed.
    // Read from the engine's cumulative counts at scrape time (they restart with a reload).
    const specCounter = (name: string, help: string, value: (s: { accepted: number; rejected: number }) => number) =>
      new Counter({
        name,
        help,
        labelNames: ["model", "version"],
        registers,
        collect() {
          this.reset();
          loaded((l, labels) => l.speculative && this.inc(labels, value(l.speculative)));
        },
      });
    specCounter("spindle_spec_draft_tokens_total", "Tokens predicted by speculative decoding and evaluated ahead.", (s) => s.accepted + s.rejected);
    specCounter("spindle_spec_accepted_tokens_total", "Predicted tokens the model confirmed (kept without a decode step of their own).", (s) => s.accepted);
    // Whole-process figures, one series each: endpoint pickers (the inference gateway's EPP)
    // read one series per metric name, so per-model series would make them see one model only.
    const processGauge = (name: string, help: string, value: (loaded: NonNullable<VersionSnapshot["loaded"]>[]) => number) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.set(value(snapshot().versions.flatMap((v) => (v.loaded ? [v.loaded] : []))));
        },
      });
    processGauge("spindle_process_requests_waiting", "Requests waiting for a slot, all models.", (ls) => ls.reduce((n, l) => n + l.scheduler.waiting, 0));
    processGauge("spindle_process_requests_running", "Requests holding a slot, all models.", (ls) => ls.reduce((n, l) => n + l.scheduler.busySlots, 0));
    processGauge("spindle_process_kv_cache_usage_ratio", "KV cache cells holding tokens of running requests over all cells, all loaded models (0-1).", (ls) => {
      const cells = ls.reduce((n, l) => n + l.kvCells, 0);
      return cells > 0 ? ls.reduce((n, l) => n + l.scheduler.runningTokens, 0) / cells : 0;
    });
    gauge("spindle_model_memory_bytes", "Model weights in memory.", (set) => loaded((l, labels) => set(labels, l.weightsBytes)));
    new Gauge({
      name: "spindle_models_resident",
      help: "Model versions in memory.",
      registers,
      collect() {
        this.set(snapshot().versions.filter((v) => v.loaded !== undefined).length);
      },
    });
    gauge("spindle_model_ready", "1 when the model version is loaded and warmed.", (set) => each((e, l) => set(l, e.state === "ready" ? 1 : 0)));
    gauge("spindle_model_state", "1 for the state the model version is in.", (set) => each((e, l) => set({ ...l, state: e.state }, 1)), ["state"]);
    gauge(
      "spindle_model_memory_estimated_bytes",
      "Memory a version needs when loaded (weights + KV + compute buffers), estimated before loading.",
      (set) => each((e, l) => e.estimate && (set({ ...l, memory: "ram" }, e.estimate.ram), set({ ...l, memory: "vram" }, e.estimate.vram))),
      ["memory"],
    );
    gauge(
      "spindle_model_memory_allocated_bytes",
      "Memory llama.cpp reports it allocated for a resident version.",
      (set) => each((e, l) => e.actual && (set({ ...l, memory: "ram" }, e.actual.ram), set({ ...l, memory: "vram" }, e.actual.vram))),
      ["memory"],
    );
    new Gauge({
      name: "spindle_memory_budget_bytes",
      help: "The memory budget resident versions must fit in (--memory-budget; vram: --vram-budget).",
      labelNames: ["memory"],
      registers,
      collect() {
        const b = snapshot().budget;
        this.set({ memory: "ram" }, b.ram);
        if (Number.isFinite(b.vram)) this.set({ memory: "vram" }, b.vram);
      },
    });
    new Gauge({
      name: "spindle_memory_resident_estimated_bytes",
      help: "Estimated memory of the resident versions, counted against the budget.",
      labelNames: ["memory"],
      registers,
      collect() {
        const u = snapshot().used;
        this.set({ memory: "ram" }, u.ram);
        this.set({ memory: "vram" }, u.vram);
      },
    });
  }

  modelEvicted(model: string, version: string, reason: EvictionReason): void {
    this.evictions.inc({ model, version, reason });
  }

  shadowRequest(model: string, version: string, outcome: string): void {
    if (this.enabled) this.shadows.inc({ model, version, outcome });
  }

  repositoryChange(name: string, action: string): void {
    this.repositoryChanges.inc({ name, action });
  }

  /** Per-model figures, bound once, for the scheduler's hot path. */
  schedulerObserver(model: string, version: string): SchedulerObserver | undefined {
    if (!this.enabled) return undefined;
    const labels = { model, version };
    const itl = this.itl.child(labels);
    const seqs = this.stepSequences.child(labels);
    const toks = this.stepTokens.child(labels);
    return {
      interTokenLatency: (s) => itl.observe(s),
      decodeStep: (n, t) => {
        seqs.observe(n);
        toks.observe(t);
      },
    };
  }

  modelLoaded(model: string, version: string, loadSeconds: number, warmupSeconds: number): void {
    this.loads.inc({ model, version });
    this.loadDuration.observe({ model, version }, loadSeconds);
    this.warmupDuration.observe({ model, version }, warmupSeconds);
  }

  modelLoadFailed(model: string, version: string): void {
    this.loadFailures.inc({ model, version });
  }

  /** Once per request, when it ends (whatever the transport). */
  requestFinished(r: RequestRecord): void {
    if (!this.enabled) return;
    const mv = { model: r.model?.id ?? UNKNOWN, version: r.model?.version ?? UNKNOWN };
    const endpoint = r.endpoint;
    this.requests.inc({ endpoint, ...mv, status_class: `${Math.floor(r.status / 100)}xx`, finish_reason: r.finishReason ?? "none" });
    if (r.error !== undefined) this.errors.inc({ endpoint, ...mv, type: r.error.kind });
    this.duration.observe({ endpoint, ...mv }, (r.end - r.start) / 1000);
    const tl = r.timeline;
    if (tl?.queuedAt !== undefined && tl.startedAt !== undefined) this.queueWait.observe(mv, (tl.startedAt - tl.queuedAt) / 1000);
    if (tl?.firstTokenAt !== undefined) this.ttft.observe(mv, (tl.firstTokenAt - r.start) / 1000);
    const u = r.usage;
    if (r.key !== undefined) {
      this.keyRequests.inc({ key: r.key, status_class: `${Math.floor(r.status / 100)}xx` });
      if (u !== undefined) {
        this.keyTokens.inc({ key: r.key, kind: "prompt" }, u.promptTokens);
        this.keyTokens.inc({ key: r.key, kind: "completion" }, u.completionTokens);
      }
    }
    if (u !== undefined) {
      this.promptTokensPerRequest.observe(mv, u.promptTokens);
      this.promptTokens.inc(mv, u.promptTokens);
      this.cachedTokens.inc(mv, u.cachedTokens);
      this.completionTokensPerRequest.observe(mv, u.completionTokens);
      this.completionTokens.inc(mv, u.completionTokens);
    }
  }
}
