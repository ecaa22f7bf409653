/**
 * The engine adapter: with its sibling files, the only code that imports node-llama-cpp.
 * It loads models, owns their contexts and sequences, estimates what a load will take,
 * and exposes tokens in and tokens out. It knows nothing of HTTP or of requests.
 */
import { readFileSync } from "node:fs";
import { getLlama, GgmlType, GgufInsights, readGgufFileInfo, LlamaLogLevel, type GgufFileInfo, type Llama, type LlamaModel } from "node-llama-cpp";
import { decodingSequencesQueuedIn, StepGate } from "./batch-strategy.js";
import { DraftModel, type DraftContextShape } from "./draft.js";
import { EngineModel, type SlotContext } from "./model.js";
import { runAheadMarksOf } from "./run-ahead.js";
import { routeStepCalls } from "./step-calls.js";
import { loneStepPlace, stepsOnJsThread, stepsRunAhead, type LoneStepPlace, type StepThread } from "./step-thread.js";
import { effectiveSpeculation, predictorFactory } from "./speculation.js";
import { resolveRenderer } from "./templates.js";
import { diagnoseBackend } from "./backend-diagnosis.js";
import { BackendUnavailableError, firstLine, ModelLoadError, slotClassesOf, type KvCacheType, type KvCacheTypes, type EngineBinary, type EstimateOptions, type GpuBackend, type LoadOptions, type MemoryFootprint, type SlotClass } from "./types.js";

/** node-llama-cpp's name for a KV type (its GgmlType enum); undefined keeps its F16 default. */
function ggmlType(t: KvCacheType | undefined): GgmlType | undefined {
  return t === undefined ? undefined : GgmlType[t.toUpperCase() as keyof typeof GgmlType];
}

/** Width of one attention head (key length), from the GGUF header; 0 where it does not say. */
function headSizeOf(info: GgufFileInfo): number {
  const a = info.architectureMetadata as { embedding_length?: number; attention?: { key_length?: number; head_count?: number | number[] } } | undefined;
  const heads = Array.isArray(a?.attention?.head_count) ? a.attention.head_count[0] : a?.attention?.head_count;
  return a?.attention?.key_length ?? (a?.embedding_length && heads ? a.embedding_length / heads : 0);
}

export type EngineBuild = { type: "prebuilt" | "local"; cpuVariant: string };

/**
 * Which llama.cpp binary a Llama runs: node-llama-cpp's prebuilt one (compiled for every
 * CPU kind, picking a ggml CPU variant at load: libggml-cpu-zen4.so is "zen4", where the OS
 * says) or a local build (`npm run engine:build`, compiled for this CPU: "native").
 */
export function buildOf(llama: Llama): EngineBuild {
  const local = llama.buildType === "localBuild";
  let variant: string | undefined;
  try {
    variant = /libggml-cpu-([\w-]+)\.so/.exec(readFileSync("/proc/self/maps", "utf8"))?.[1];
  } catch {
    variant = undefined;
  }
  return { type: local ? "local" : "prebuilt", cpuVariant: variant ?? (local ? "native" : "unknown") };
}

/**
 * getLlama's options for a binary choice. node-llama-cpp always prefers a local build whose
 * build options match; a custom CMake option that no local build has makes none match, and
 * the prebuilt binary (chosen without custom options) loads. "local" forbids the prebuilt one.
 */
export function binaryOptions(binary: EngineBinary): { cmakeOptions?: Record<string, string>; usePrebuiltBinaries?: boolean } {
  if (binary === "prebuilt") return { cmakeOptions: { SPINDLE_PREBUILT_ONLY: "ON" } };
  if (binary === "local") return { usePrebuiltBinaries: false };
  return {};
}

export class Engine {
  private constructor(
    readonly llama: Llama,
    /** Where steps of one sequence run (step-thread.ts). */
    readonly loneSteps: LoneStepPlace,
    /** Whether greedy steps run ahead on the steady thread (run-ahead.ts). */
    readonly runsAhead: boolean,
  ) {}

  static async create(gpu: GpuBackend, binary: EngineBinary = "auto", stepThread: StepThread = "auto"): Promise<Engine> {
    let llama: Llama;
    try {
      llama = await getLlama({
        gpu: gpu === "cpu" ? false : gpu,
        // Never download or compile a binary at start: a missing one is an error.
        build: "never",
        ...binaryOptions(binary),
        // 0: every context uses exactly the threads it asks for, no library-side splitting.
        maxThreads: 0,
        logLevel: LlamaLogLevel.error,
        progressLogs: false,
      });
    } catch (err) {
      if (gpu === "cuda" || gpu === "vulkan" || gpu === "metal") throw new BackendUnavailableError(`--gpu ${gpu}: ${diagnoseBackend(gpu)}`);
      if (binary === "local") throw new BackendUnavailableError(`--engine-build local: no local build of llama.cpp for this machine and backend (npm run engine:build makes one)`);
      throw err;
    }
    // A backend asked for by name must be the one that runs, not a silent fallback.
    if ((gpu === "cuda" || gpu === "vulkan" || gpu === "metal") && llama.gpu !== gpu) {
      await llama.dispose();
      throw new BackendUnavailableError(`--gpu ${gpu}: ${diagnoseBackend(gpu)}`);
    }
    const place = loneStepPlace(llama, stepThread);
    return new Engine(llama, place, stepsRunAhead(stepThread, place));
  }

  async vramTotal(): Promise<number> {
    return (await this.llama.getVramState()).total;
  }

  get backend(): string {
    return this.llama.gpu === false ? "cpu" : this.llama.gpu;
  }

  /** Which llama.cpp binary runs; the two differ in speed (README, "Engine builds"). */
  get build(): EngineBuild {
    return buildOf(this.llama);
  }

  /**
   * "auto": on for GPU backends; on the CPU, on for a local build (npm run engine:build) and
   * off for the prebuilt binary, whose flash-attention kernels convert f16 one value at a
   * time here (decode 1.2–2.1× slower with it on); off too where attention heads are under
   * 32 wide, where it prefilled 3.4–3.6× slower (stories260K's 8). Measured by
   * `npm run bench -- micro flash-attention --engine-build local|prebuilt` and W2 (README).
   */
  private flashAttentionFor(choice: "auto" | "on" | "off", kv: KvCacheTypes | undefined, id: string, headSize: number): boolean | "auto" {
    // llama.cpp stores a quantized V cache only with flash attention: "auto" turns it on.
    const quantizedV = kv !== undefined && !["f16", "bf16", "f32"].includes(kv.v);
    if (quantizedV && choice === "off") throw new ModelLoadError(`model "${id}": a ${kv.v} V cache needs flash attention, which --flash-attention off turns off`);
    if (choice === "on" || quantizedV) return true;
    if (choice === "off") return false;
    if (this.llama.gpu !== false) return "auto";
    return this.llama.buildType === "localBuild" && headSize >= 32;
  }

  private gpuLayersFor(choice: number | "max" | undefined, totalLayers: number): number {
    if (this.llama.gpu === false) return 0;
    return choice === undefined || choice === "max" ? totalLayers : Math.min(choice, totalLayers);
  }

  /** The context a load creates: one place, so the estimate and the load cannot differ. */
  private static contextShape(ctxSize: number | undefined, trained: number | undefined, parallel: number) {
    const contextSize = ctxSize ?? Math.min(2048, trained ?? 2048);
    return { contextSize, batchSize: Math.min(512, contextSize * parallel) };
  }

  /**
   * What loading this version would take (weights + KV + compute buffers), from the GGUF
   * header alone, with node-llama-cpp's V2 estimators (`npm run bench -- residency`
   * compares them with what llama.cpp then allocates).
   */
  async estimate(opts: EstimateOptions): Promise<MemoryFootprint> {
    const classes = slotClassesOf(opts);
    const target = await this.estimateOne(opts.id, opts.path, opts, classes, opts.kvCacheTypes, opts.embeddings === true);
    const draft = opts.speculative?.method === "draft" ? await this.estimateOne(opts.id, opts.speculative.path, opts, target.shapes, undefined, false) : undefined;
    return { ram: target.ram + (draft?.ram ?? 0), vram: target.vram + (draft?.vram ?? 0) };
  }

  /** Weights and contexts of one model file (a version's, or its draft's, which mirrors its slot classes). */
  private async estimateOne(id: string, path: string, opts: EstimateOptions, classes: readonly SlotClass[], kv: KvCacheTypes | undefined, embeddings: boolean) {
    let insights: GgufInsights;
    let info: GgufFileInfo;
    try {
      info = await readGgufFileInfo(path, { logWarnings: false });
      insights = await GgufInsights.from(info, this.llama);
    } catch (err) {
      throw new ModelLoadError(`model "${id}": cannot load ${path}: ${firstLine(err)}`);
    }
    const gpuLayers = this.gpuLayersFor(opts.gpuLayers, insights.totalLayers);
    const weights = await insights.estimateModelResourceRequirementsV2({ gpuLayers });
    let ram = weights.cpuRam;
    let vram = weights.gpuVram;
    // One context per slot class, each estimated as it will be created.
    const shapes: SlotClass[] = [];
    for (const cls of classes) {
      const { contextSize, batchSize } = Engine.contextShape(cls.ctxSize, insights.trainContextSize, cls.count);
      shapes.push({ count: cls.count, ctxSize: contextSize });
      const context = await insights.estimateContextResourceRequirementsV2({
        contextSize,
        sequences: cls.count,
        batchSize,
        modelGpuLayers: gpuLayers,
        flashAttention: this.flashAttentionFor(opts.flashAttention ?? "auto", kv, id, headSizeOf(info)),
        kvCacheKeyType: ggmlType(kv?.k),
        kvCacheValueType: ggmlType(kv?.v),
      });
      ram += context.cpuRam;
      vram += context.gpuVram;
    }
    if (embeddings) {
      const largest = shapes[shapes.length - 1]!.ctxSize!;
      const e = await insights.estimateContextResourceRequirementsV2({ contextSize: largest, sequences: 1, batchSize: largest, modelGpuLayers: gpuLayers, isEmbeddingContext: true });
      ram += e.cpuRam;
      vram += e.gpuVram;
    }
    return { ram, vram, shapes };
  }

  async loadModel(opts: LoadOptions): Promise<EngineModel> {
    let model: LlamaModel;
    if (opts.faults && opts.faults.failNextLoads > 0) {
      opts.faults.failNextLoads--;
      throw new ModelLoadError(`model "${opts.id}": cannot load ${opts.path}: injected load failure`);
    }
    const mmap = opts.mmap !== false;
    try {
      model = await this.llama.loadModel({ modelPath: opts.path, gpuLayers: this.llama.gpu === false ? 0 : (opts.gpuLayers ?? "max"), useMmap: mmap });
    } catch (err) {
      throw new ModelLoadError(`model "${opts.id}": cannot load ${opts.path}: ${firstLine(err)}`);
    }
    let draft: DraftModel | undefined;
    const contexts: SlotContext[] = [];
    try {
      // One context per slot class; node-llama-cpp batches each context's sequences into its own decode steps.
      const shapes: DraftContextShape[] = [];
      const classes = slotClassesOf(opts);
      for (const [slotClass, cls] of classes.entries()) {
        const { contextSize, batchSize } = Engine.contextShape(cls.ctxSize, model.trainContextSize, cls.count);
        const stepGate = new StepGate(opts.observer, opts.faults, slotClass);
        const context = await model.createContext({
          sequences: cls.count,
          contextSize,
          threads: opts.threads,
          batchSize,
          batching: { itemPrioritizationStrategy: stepGate.strategy, dispatchSchedule: stepGate.dispatchSchedule },
          flashAttention: this.flashAttentionFor(opts.flashAttention ?? "auto", opts.kvCacheTypes, opts.id, headSizeOf(model.fileInfo)),
          experimentalKvCacheKeyType: ggmlType(opts.kvCacheTypes?.k),
          experimentalKvCacheValueType: ggmlType(opts.kvCacheTypes?.v),
        });
        stepGate.decodingSequencesQueued = decodingSequencesQueuedIn(context);
        const js = this.loneSteps !== "jobs";
        const faults = opts.faults;
        const aheadMarks = runAheadMarksOf(context);
        const runsAhead = this.runsAhead;
        routeStepCalls(context, {
          mayReorder: () => stepGate.mixedStep,
          stepHere: () => js && stepsOnJsThread(stepGate.stepSequences, stepGate.stepTokens),
          steadyThread: this.loneSteps === "steady-thread",
          runAhead: () => runsAhead && stepGate.stepTokens === stepGate.stepSequences && aheadMarks.allWanted(stepGate.stepSequenceIds, stepGate.stepSequences),
          slowStepMs: faults && (() => faults.slowStepMs),
        });
        contexts.push({ context, ctxSize: contextSize });
        shapes.push({ sequences: cls.count, contextSize, batchSize });
      }
      const ctxSize = contexts[contexts.length - 1]!.ctxSize;
      // Embeddings get a context of their own: one input at a time, the largest class long.
      const embedding = opts.embeddings ? await model.createEmbeddingContext({ contextSize: ctxSize, batchSize: ctxSize, threads: opts.threads }) : undefined;
      const speculative = effectiveSpeculation(opts.speculative, opts.id, opts.warn);
      if (speculative?.method === "draft") {
        draft = await DraftModel.load(this.llama, speculative, shapes, {
          id: opts.id,
          threads: opts.threads,
          gpuLayers: opts.gpuLayers ?? "max",
          mmap,
          flashAttention: (m) => this.flashAttentionFor(opts.flashAttention ?? "auto", undefined, opts.id, headSizeOf(m.fileInfo)),
          loneSteps: this.loneSteps,
        });
        draft.checkCompatible(opts.id, contexts[0]!.context);
      }
      const running = () => {
        let n = 0;
        for (let c = 0; c < classes.length; c++) n += opts.observer.expectedItems(c);
        return n;
      };
      const predictorFor = predictorFactory(speculative, draft, running);
      const engineModel = new EngineModel(opts.id, this.llama, model, contexts, embedding, opts.kvCacheTypes ?? { k: "f16", v: "f16" }, speculative, draft, predictorFor);
      const { renderer, guessed } = resolveRenderer(this.llama, model, opts.chatTemplate, opts.id, (text) => engineModel.tokenizePrompt(text));
      engineModel.useRenderer(renderer);
      if (guessed) {
        opts.warn?.(`model "${opts.id}" has no chat template: chats are rendered with node-llama-cpp's guess (${renderer.name}); name one with chat_template in the models file or --chat-template`);
      }
      return engineModel;
    } catch (err) {
      await draft?.dispose();
      for (const { context } of contexts) await context.dispose();
      await model.dispose();
      if (err instanceof ModelLoadError) throw err;
      throw new ModelLoadError(`model "${opts.id}": cannot create a context: ${firstLine(err)}`);
    }
  }

  async dispose(): Promise<void> {
    await this.llama.dispose();
  }
}
