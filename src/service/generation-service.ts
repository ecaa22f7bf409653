/**
 * The generation service: the one owner of a generation's life, whatever API and
 * transport it came through. A transport opens a run for each request; the run admits
 * it (accepting, the tenant's limits and model scope), reads its deadline and priority,
 * resolves the model name and holds the version's lease (loading it if need be), lets
 * the protocol's plan prepare the prompt, submits it to the scheduler, streams the
 * events back, mirrors shadow traffic, releases everything, and reports one record to
 * the observers. Every path out of a run goes through one `finally`.
 */
import { mayUse } from "../access/keys.js";
import type { KeyLimits, LimitLease } from "../access/limits.js";
import { ApiError, toApiError } from "../errors.js";
import type { Acquired, Lease, LoadedModel, ModelRegistry } from "../models/registry.js";
import type { RequestObservation, RequestObserver, RequestRecord } from "../observers.js";
import type { GenerationOutcome, GenerationRequest, TokenLogprob, TokenSink } from "../scheduler/types.js";
import { ChatOutputParser, type ToolCallDelta } from "./chat-output.js";
import type { ChoiceResult, EmbeddingPlan, EmbeddingResult, GenerationEvents, GenerationPlan, PreparedPrompt, PromptModel, RequestInfo, RunOutcome, StartInfo } from "./generation.js";
import { requestTiming, type RequestTiming } from "./sampling.js";

export interface GenerationServiceOptions {
  registry: ModelRegistry;
  limits: KeyLimits;
  requests: RequestObserver;
  /** Shadow outcomes (their own metric: they never count as the client's requests). */
  onShadow: (model: string, version: string, outcome: string) => void;
  defaultTimeoutSeconds: number;
  /** False while shutting down: new requests get 503. */
  isAccepting: () => boolean;
}

const promptModels = new WeakMap<LoadedModel, PromptModel>();

/** What a plan may use of a loaded version; made once per load. */
function promptModel(m: LoadedModel): PromptModel {
  let p = promptModels.get(m);
  if (!p) {
    const e = m.engine;
    p = {
      key: m.key,
      ctxSize: e.ctxSize,
      vocabularySize: e.vocabularySize,
      maxTokenChars: e.maxTokenChars,
      sampling: m.spec.sampling,
      tokenize: (text) => e.tokenizePrompt(text),
      renderChat: (input) => e.renderChat(input),
      template: e.templateCapabilities,
      detokenize: (tokens) => e.detokenize(tokens),
      isValidToken: (t) => e.isValidToken(t),
    };
    promptModels.set(m, p);
  }
  return p!;
}

/** OpenAI's system_fingerprint: which artifact and engine served the answer. */
function fingerprint(m: LoadedModel): string {
  return `fp_${(m.spec.sha256 ?? m.key).replace(/[^0-9a-zA-Z]/g, "").slice(0, 10)}`;
}

/** One choice's events as they happen, or kept (best_of candidates) to be replayed for the picked ones. */
type Replay = Array<(events: GenerationEvents, index: number) => void>;

export class GenerationService {
  constructor(private readonly opts: GenerationServiceOptions) {}

  /** Starts one request's life: its record and trace begin now (the trace id can go in the answer's headers). */
  open(info: RequestInfo): GenerationRun {
    return new GenerationRun(this.opts, info);
  }
}

export class GenerationRun {
  private readonly start = performance.now();
  private readonly observation: RequestObservation;
  private readonly record: RequestRecord;
  private used = false;

  constructor(
    private readonly opts: GenerationServiceOptions,
    private readonly info: RequestInfo,
  ) {
    this.observation = opts.requests.start({ id: info.id, endpoint: info.endpoint, transport: info.transport, headers: info.headers });
    this.record = {
      id: info.id,
      endpoint: info.endpoint,
      transport: info.transport,
      model: undefined,
      route: undefined,
      key: info.principal?.name,
      status: 200,
      finishReason: undefined,
      error: undefined,
      usage: undefined,
      start: this.start,
      end: this.start,
      modelWait: undefined,
      timeline: undefined,
      sampling: undefined,
      responseId: undefined,
    };
  }

  get traceId(): string | undefined {
    return this.observation.traceId;
  }

  /** Names the answer's id (e.g. "chatcmpl-…") in the record and the trace. */
  set responseId(id: string) {
    this.record.responseId = id;
  }

  /**
   * Runs the generation. `parse` turns the request into a plan (its errors are the run's
   * too); `eventsFor` gives the plan's events sink (JSON body or stream). Never throws:
   * errors before the first event are the outcome's, for the transport to answer.
   */
  async generate<P extends GenerationPlan>(parse: () => P, eventsFor: (plan: P) => GenerationEvents): Promise<RunOutcome> {
    if (this.used) throw new Error("a run generates once");
    this.used = true;
    const record = this.record;
    let started = false;
    let events: GenerationEvents | undefined;
    const held: Held = {};
    try {
      const { info } = this;
      const plan = this.admit(parse, held);
      const sink = (events = eventsFor(plan));
      const { timing, acquired } = await this.acquire(plan, held);
      const model = acquired.lease.model;
      const prepared = this.prepare(plan, model);
      const choices = Math.max(1, prepared.choices ?? 1);
      const candidates = Math.max(choices, prepared.candidates ?? choices);
      // Every choice ends when one fails or the client goes; the transport's reason comes along.
      const abort = new AbortController();
      const onAbort = () => abort.abort(info.signal.reason);
      if (info.signal.aborted) onAbort();
      else info.signal.addEventListener("abort", onAbort, { once: true });
      const gens = Array.from({ length: candidates }, (_, i) => this.request(prepared, model, timing, abort.signal, i, candidates > choices));
      const gen = gens[0]!;
      record.timeline = gen.timeline;
      record.sampling = { maxTokens: gen.maxTokens, temperature: gen.sampling.temperature, topP: gen.sampling.topP, seed: gen.sampling.seed, promptTokens: gen.promptTokens.length };
      if (held.shadow) {
        const shadow = held.shadow;
        held.shadow = undefined;
        this.mirror(shadow, plan, timing);
      }
      const startInfo: StartInfo = { model: model.key, created: Math.floor(Date.now() / 1000), headers: held.limit!.headers, fingerprint: fingerprint(model), choices, promptTokens: gen.promptTokens.length };
      const start = () => {
        if (started) return;
        started = true;
        sink.onStart(startInfo);
      };
      // best_of: candidates run unseen; the best `choices` of them are replayed at the end.
      const replays: Replay[] | undefined = candidates > choices ? gens.map(() => []) : undefined;
      const parsers = gens.map((_, i) => (prepared.output ? this.parser(prepared, i, sink, replays?.[i]) : undefined));
      const sinks: TokenSink[] = gens.map((_, i) => this.tokenSink(i, start, sink, parsers[i], replays?.[i]));
      let outcomes: GenerationOutcome[];
      try {
        // A choice that fails ends the others: the request fails as one.
        outcomes = await Promise.all(
          gens.map((g, i) =>
            model.scheduler.submit(g, sinks[i]!).then((o) => {
              if ("error" in o && !abort.signal.aborted) abort.abort(o.error);
              return o;
            }),
          ),
        );
      } catch (err) {
        abort.abort(err);
        throw err;
      } finally {
        info.signal.removeEventListener("abort", onAbort);
      }
      const failed = outcomes.find((o) => "error" in o && o.error === abort.signal.reason) ?? outcomes.find((o) => "error" in o);
      const completion = outcomes.reduce((n, o) => n + (("result" in o ? o.result.usage : o.usage)?.completionTokens ?? 0), 0);
      const first = "result" in outcomes[0]! ? outcomes[0].result.usage : outcomes[0]!.usage;
      record.usage = first ? { ...first, completionTokens: completion } : undefined;
      if (failed && "error" in failed) throw failed.error;
      const results: ChoiceResult[] = outcomes.map((o, i) => {
        parsers[i]?.finish();
        const r = (o as { result: { finishReason: "stop" | "length"; stopString?: string } }).result;
        return { index: i, finishReason: (parsers[i]?.toolCalls ?? 0) > 0 ? "tool_calls" : r.finishReason, stopString: r.stopString };
      });
      let final = results;
      if (replays) {
        // Highest mean log probability per token first (OpenAI's best_of).
        const mean = (i: number) => {
          const r = (outcomes[i] as { result: { logprobSum?: number; usage: { completionTokens: number } } }).result;
          return (r.logprobSum ?? 0) / Math.max(1, r.usage.completionTokens);
        };
        const picked = results.map((_, i) => i).sort((a, b) => mean(b) - mean(a)).slice(0, choices);
        final = picked.map((i, k) => {
          for (const ev of replays[i]!) ev(sink, k);
          return { ...results[i]!, index: k };
        });
      }
      for (const c of final) sink.onChoiceDone?.(c);
      record.finishReason = final[0]!.finishReason;
      sink.onDone({ choices: final, usage: record.usage! });
      return { error: undefined, started };
    } catch (err) {
      const error = this.failed(err);
      // After the first event the answer is under way: the error travels in it.
      if (started) events?.onError(error);
      return { error, started };
    } finally {
      this.release(held);
    }
  }

  /**
   * Runs an embedding request: the same admission, leases, limits and record as a
   * generation; the version's embedding context does the work. Never throws.
   */
  async embed(parse: () => EmbeddingPlan): Promise<{ error: ApiError; result?: undefined } | { error?: undefined; result: EmbeddingResult }> {
    if (this.used) throw new Error("a run generates once");
    this.used = true;
    const record = this.record;
    const held: Held = {};
    try {
      const plan = this.admit(parse, held);
      const { acquired } = await this.acquire(plan, held);
      const model = acquired.lease.model;
      if (!model.engine.embeds) {
        throw new ApiError("invalid_request", `The model '${model.key}' does not serve embeddings (set embeddings: true for it in the models file, or start with --embeddings).`, {
          param: "model",
          code: "model_not_embedding",
        });
      }
      const pm = promptModel(model);
      const prepared = plan.prepare({ ...pm, embeddingSize: model.engine.embeddingSize, dimensions: model.spec.embeddings?.dimensions ?? [] });
      const promptTokens = prepared.inputs.reduce((n, t) => n + t.length, 0);
      const t0 = performance.now();
      record.timeline = { queuedAt: t0, startedAt: t0 };
      // The deadline holds here too: between inputs, a late request stops.
      const left = Math.max(0, held.timing!.deadline - performance.now());
      const signal = AbortSignal.any([this.info.signal, AbortSignal.timeout(Math.ceil(Math.min(left, 2 ** 31 - 1)))]);
      let vectors: number[][];
      try {
        vectors = await model.engine.embed(prepared.inputs, signal);
      } catch (err) {
        if (this.info.signal.aborted) throw new ApiError("cancelled", "The client closed the request.", { code: "client_disconnected" });
        if (signal.aborted) throw new ApiError("timeout", "The request's deadline passed while its inputs were embedded.", { code: "generation_timeout" });
        throw new ApiError("model_error", `The model failed while embedding: ${(err as Error).message}`, { cause: err });
      }
      record.timeline.endedAt = performance.now();
      record.usage = { promptTokens, completionTokens: 0, cachedTokens: 0 };
      record.finishReason = "stop";
      const dims = prepared.dimensions;
      return { result: { model: model.key, vectors: dims ? vectors.map((v) => renormalised(v.slice(0, dims))) : vectors, promptTokens } };
    } catch (err) {
      return { error: this.failed(err) };
    } finally {
      this.release(held);
    }
  }

  /** Accepting, the plan, its deadline, the tenant's scope and limits: what every request passes first. */
  private admit<P extends { model: string; stream?: boolean }>(parse: () => P, held: Held): P {
    const { opts, info } = this;
    if (!opts.isAccepting()) throw new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" });
    const plan = parse();
    if (plan.stream && info.transport === "http") this.record.transport = "sse";
    held.timing = requestTiming(info.headers, opts.defaultTimeoutSeconds, info.principal, this.start);
    if (!mayUse(info.principal, plan.model)) {
      throw new ApiError("forbidden", `This API key may not use the model '${plan.model}'.`, { param: "model", code: "model_not_allowed" });
    }
    held.limit = opts.limits.admit(info.principal);
    return plan;
  }

  /** Resolves the name and leases its version (loading it if need be); the record learns which served it. */
  private async acquire(plan: { model: string; user?: string }, held: Held): Promise<{ timing: RequestTiming; acquired: Acquired }> {
    const record = this.record;
    const timing = held.timing!;
    const waitStart = performance.now();
    const acquired = await this.opts.registry.acquire(plan.model, plan.user, timing.deadline, this.info.signal);
    held.lease = acquired.lease;
    held.shadow = acquired.shadow;
    const waitEnd = performance.now();
    const model = acquired.lease.model;
    record.model = { id: model.id, version: model.version };
    record.route = acquired.via;
    if (waitEnd - waitStart >= MODEL_WAIT_REPORTED_MS) record.modelWait = { start: waitStart, end: waitEnd };
    return { timing, acquired };
  }

  private failed(err: unknown): ApiError {
    const error = toApiError(err);
    this.record.status = error.status;
    this.record.error = { kind: error.kind, code: error.code, message: error.message };
    if (error.kind === "internal" || error.kind === "model_error") {
      const cause = error.cause as Error | undefined;
      if (cause) this.record.error.cause = (cause.stack ?? String(cause)).split("\n").slice(0, 4).join(" | ");
    }
    return error;
  }

  /** Every path out of a run: leases released, the tenant's tokens counted, one record reported. */
  private release(held: Held): void {
    const record = this.record;
    held.shadow?.release();
    held.lease?.release();
    held.limit?.release(record.usage ? record.usage.promptTokens + record.usage.completionTokens : 0);
    record.end = performance.now();
    this.observation.finish(record);
  }

  /** The plan's prompt for this model, its grammar compiled (a grammar llama.cpp refuses is the client's 400). */
  private prepare(plan: GenerationPlan, model: LoadedModel): PreparedPrompt & { compiled: unknown } {
    const p = plan.prepare(promptModel(model));
    let compiled: unknown;
    if (p.grammar !== undefined) {
      try {
        compiled = model.engine.grammar(p.grammar);
      } catch (err) {
        throw new ApiError("invalid_request", `The grammar is not valid GBNF: ${(err as Error).message}`, { param: "grammar", code: "invalid_grammar" });
      }
    }
    return { ...p, compiled };
  }

  /**
   * One engine request: choice `i` of the prepared prompt, with the request's deadline and
   * priority. Choices differ by seed; only the first scores the prompt.
   */
  private request(p: PreparedPrompt & { compiled: unknown }, model: LoadedModel, timing: RequestTiming, signal: AbortSignal, i = 0, scoreChoice = false): GenerationRequest {
    const principal = this.info.principal;
    return {
      promptTokens: p.promptTokens,
      maxTokens: p.maxTokens,
      fillsContext: p.fillsContext,
      stop: p.stop,
      sampling: i === 0 ? p.sampling : { ...p.sampling, seed: (p.sampling.seed + i) >>> 0 },
      priority: timing.priority,
      deadline: timing.deadline,
      signal,
      timeline: {},
      tenant: principal ? { name: principal.name, weight: principal.weight } : undefined,
      grammar: p.compiled,
      minTokens: p.minTokens,
      stopTokenIds: p.stopTokenIds,
      includeStopString: p.includeStopString,
      logprobs: p.logprobs,
      promptLogprobs: i === 0 ? p.promptLogprobs : undefined,
      scoreChoice,
    };
  }

  /** Splits choice `i`'s text into reasoning, content and tool calls for the events (or its replay). */
  private parser(p: PreparedPrompt, i: number, events: GenerationEvents, replay: Replay | undefined): ChatOutputParser {
    if (replay) {
      return new ChatOutputParser(p.output!, {
        content: (text, logprobs) => replay.push((e, k) => e.onText(text, k, logprobs)),
        reasoning: (text) => replay.push((e, k) => e.onReasoning?.(text, k)),
        toolCall: (delta) => replay.push((e, k) => e.onToolCall?.(delta, k)),
      });
    }
    return new ChatOutputParser(p.output!, {
      content: (text, logprobs) => events.onText(text, i, logprobs),
      reasoning: (text) => events.onReasoning?.(text, i),
      toolCall: (delta: ToolCallDelta) => events.onToolCall?.(delta, i),
    });
  }

  /** Where choice `i`'s tokens go: its parser, the events, or its replay. */
  private tokenSink(i: number, start: () => void, events: GenerationEvents, parser: ChatOutputParser | undefined, replay: Replay | undefined): TokenSink {
    const onPromptLogprobs = i === 0 ? (entries: Array<TokenLogprob | null>) => events.onPromptLogprobs?.(entries) : undefined;
    if (parser) return { onStart: start, onText: parser.push, onPromptLogprobs };
    if (replay) return { onStart: start, onText: (text, logprobs) => replay.push((e, k) => e.onText(text, k, logprobs)), onPromptLogprobs };
    return { onStart: start, onText: (text, logprobs) => events.onText(text, i, logprobs), onPromptLogprobs };
  }

  /**
   * Runs the same request on the shadow version, at low priority, its output discarded.
   * It is not tied to the client (a client that leaves does not change what the shadow
   * measures) and is never counted in the client's usage, limits or request metrics.
   */
  private mirror(shadow: Lease, plan: GenerationPlan, timing: RequestTiming): void {
    const { id, version } = shadow.model;
    const report = (outcome: string) => this.opts.onShadow(id, version, outcome);
    let gen: GenerationRequest;
    try {
      gen = this.request(this.prepare(plan, shadow.model), shadow.model, { ...timing, priority: "low" }, new AbortController().signal);
    } catch {
      shadow.release();
      report("invalid");
      return;
    }
    let submitted: Promise<GenerationOutcome>;
    try {
      submitted = shadow.model.scheduler.submit(gen, DISCARD);
    } catch (err) {
      shadow.release();
      report(`error_${toApiError(err).kind}`);
      return;
    }
    submitted.then(
      (outcome) => {
        shadow.release();
        report("error" in outcome ? `error_${outcome.error.kind}` : "completed");
      },
      () => {
        shadow.release();
        report("error_internal");
      },
    );
  }
}

const DISCARD = { onStart() {}, onText() {} };

/** What a run holds until its end. */
interface Held {
  timing?: RequestTiming;
  limit?: LimitLease;
  lease?: Lease;
  /** A shadow lease not yet handed to its mirrored run. */
  shadow?: Lease;
}

function renormalised(v: number[]): number[] {
  let n = 0;
  for (const x of v) n += x * x;
  n = Math.sqrt(n) || 1;
  return v.map((x) => x / n);
}

/** A lease on a resident version takes microseconds; anything longer was a load or an eviction. */
const MODEL_WAIT_REPORTED_MS = 1;
