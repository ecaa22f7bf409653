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
import type { Lease, LoadedModel, ModelRegistry } from "../models/registry.js";
import type { RequestObservation, RequestObserver, RequestRecord } from "../observers.js";
import type { GenerationOutcome, GenerationRequest } from "../scheduler/types.js";
import type { GenerationEvents, GenerationPlan, PromptModel, RequestInfo, RunOutcome } from "./generation.js";
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
      renderChat: (messages) => e.renderChat(messages),
      detokenize: (tokens) => e.detokenize(tokens),
      isValidToken: (t) => e.isValidToken(t),
    };
    promptModels.set(m, p);
  }
  return p;
}

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
    let limit: LimitLease | undefined;
    let lease: Lease | undefined;
    try {
      const { opts, info } = this;
      if (!opts.isAccepting()) throw new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" });
      const plan = parse();
      if (plan.stream && info.transport === "http") record.transport = "sse";
      const timing = requestTiming(info.headers, opts.defaultTimeoutSeconds, info.principal, this.start);
      if (!mayUse(info.principal, plan.model)) {
        throw new ApiError("forbidden", `This API key may not use the model '${plan.model}'.`, { param: "model", code: "model_not_allowed" });
      }
      limit = opts.limits.admit(info.principal);
      const sink = (events = eventsFor(plan));
      const waitStart = performance.now();
      const acquired = await opts.registry.acquire(plan.model, plan.user, timing.deadline, info.signal);
      lease = acquired.lease;
      const waitEnd = performance.now();
      const model = lease.model;
      record.model = { id: model.id, version: model.version };
      record.route = acquired.via;
      if (waitEnd - waitStart >= MODEL_WAIT_REPORTED_MS) record.modelWait = { start: waitStart, end: waitEnd };
      const gen = this.request(plan, model, timing, info.signal);
      record.timeline = gen.timeline;
      record.sampling = { maxTokens: gen.maxTokens, temperature: gen.sampling.temperature, topP: gen.sampling.topP, seed: gen.sampling.seed, promptTokens: gen.promptTokens.length };
      if (acquired.shadow) {
        const shadow = acquired.shadow;
        acquired.shadow = undefined;
        this.mirror(shadow, plan, timing);
      }
      const startInfo = { model: model.key, created: Math.floor(Date.now() / 1000), headers: limit.headers };
      const outcome: GenerationOutcome = await model.scheduler.submit(gen, {
        onStart: () => {
          started = true;
          sink.onStart(startInfo);
        },
        onText: (text) => sink.onText(text),
      });
      record.usage = "result" in outcome ? outcome.result.usage : outcome.usage;
      if ("result" in outcome) {
        record.finishReason = outcome.result.finishReason;
        sink.onDone(outcome.result);
        return { error: undefined, started };
      }
      throw outcome.error;
    } catch (err) {
      const error = toApiError(err);
      record.status = error.status;
      record.error = { kind: error.kind, code: error.code, message: error.message };
      // After the first event the answer is under way: the error travels in it.
      if (started) events?.onError(error);
      return { error, started };
    } finally {
      lease?.release();
      limit?.release(record.usage ? record.usage.promptTokens + record.usage.completionTokens : 0);
      record.end = performance.now();
      this.observation.finish(record);
    }
  }

  /** The engine request: the plan's prompt for this model, with the request's deadline and priority. */
  private request(plan: GenerationPlan, model: LoadedModel, timing: RequestTiming, signal: AbortSignal): GenerationRequest {
    const p = plan.prepare(promptModel(model));
    const principal = this.info.principal;
    const tenant = principal ? { name: principal.name, weight: principal.weight } : undefined;
    return { ...p, priority: timing.priority, deadline: timing.deadline, signal, timeline: {}, tenant };
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
      gen = this.request(plan, shadow.model, { ...timing, priority: "low" }, new AbortController().signal);
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

/** A lease on a resident version takes microseconds; anything longer was a load or an eviction. */
const MODEL_WAIT_REPORTED_MS = 1;
