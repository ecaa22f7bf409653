/**
 * A chat model's raw text, split into what the APIs carry separately: reasoning (a
 * thinking section), content, and tool calls — as the text streams, never sending part
 * of a marker as content. Tool calls are read in the syntax of the model's template
 * family (Hermes/Qwen `<tool_call>` blocks, Mistral `[TOOL_CALLS]`, Llama 3.x JSON or
 * `<|python_tag|>`), or as the JSON a grammar forced (`tool_choice` required or named).
 */
import { randomBytes } from "node:crypto";
import type { ToolFamily } from "../engine/chat-template.js";
import type { TokenLogprob } from "../scheduler/types.js";

export interface ToolCallDelta {
  /** Position among this choice's calls. */
  index: number;
  /** With the first delta of a call: its id and function name. */
  id?: string;
  name?: string;
  /** A fragment of the arguments' JSON text. */
  arguments: string;
}

export interface OutputSpec {
  /** Text between these markers is reasoning; `open`: the prompt already opened it. */
  reasoning?: { start: string; end: string; open: boolean };
  tools?: {
    family: ToolFamily | "forced";
    /** Forced output: one call object, or a list of them. */
    list?: boolean;
  };
}

export interface OutputChannels {
  content(text: string, logprobs: TokenLogprob[] | undefined): void;
  reasoning(text: string): void;
  toolCall(delta: ToolCallDelta): void;
}

const callId = () => `call_${randomBytes(12).toString("hex")}`;

/** The longest suffix of `text` that is a proper prefix of `marker`. */
function partialSuffix(text: string, marker: string): number {
  for (let n = Math.min(text.length, marker.length - 1); n > 0; n--) if (marker.startsWith(text.slice(text.length - n))) return n;
  return 0;
}

/** A parsed call from a JSON object: {"name", "arguments" | "parameters"}. */
function asCall(v: unknown): { name: string; arguments: string } | undefined {
  if (v === null || typeof v !== "object" || Array.isArray(v)) return undefined;
  const o = v as Record<string, unknown>;
  const fn = (o.function && typeof o.function === "object" ? o.function : o) as Record<string, unknown>;
  if (typeof fn.name !== "string") return undefined;
  const args = fn.arguments ?? fn.parameters ?? {};
  return { name: fn.name, arguments: typeof args === "string" ? args : JSON.stringify(args) };
}

function parseCalls(text: string): Array<{ name: string; arguments: string }> | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  const list = Array.isArray(v) ? v : [v];
  const calls = list.map(asCall);
  return calls.length > 0 && calls.every((c) => c !== undefined) ? (calls as Array<{ name: string; arguments: string }>) : undefined;
}

/** Splits reasoning from the rest; the rest goes to the next stage. */
class ReasoningSplitter {
  private inside: boolean;
  private held = "";
  private seenContent = false;
  /** Just after a thinking section: the whitespace that separates it from the answer is dropped. */
  private trimNext = false;

  constructor(
    private readonly markers: { start: string; end: string; open: boolean },
    private readonly reasoning: (text: string) => void,
    private readonly rest: (text: string, logprobs?: TokenLogprob[]) => void,
  ) {
    this.inside = markers.open;
  }

  push(text: string, logprobs?: TokenLogprob[]): void {
    let buf = this.held + text;
    this.held = "";
    for (;;) {
      if (this.inside) {
        const at = buf.indexOf(this.markers.end);
        if (at === -1) {
          const keep = partialSuffix(buf, this.markers.end);
          if (buf.length > keep) this.reasoning(buf.slice(0, buf.length - keep));
          this.held = buf.slice(buf.length - keep);
          return;
        }
        if (at > 0) this.reasoning(buf.slice(0, at));
        buf = buf.slice(at + this.markers.end.length);
        this.inside = false;
        this.seenContent = true;
        this.trimNext = true;
        continue;
      }
      if (this.trimNext) {
        buf = buf.replace(/^\s+/, "");
        if (buf === "") return;
        this.trimNext = false;
      }
      // A thinking section opens only at the start of the output.
      if (!this.seenContent) {
        const trimmed = buf.replace(/^\s+/, "");
        if (trimmed.startsWith(this.markers.start)) {
          buf = trimmed.slice(this.markers.start.length);
          this.inside = true;
          continue;
        }
        if (trimmed === "" || this.markers.start.startsWith(trimmed)) {
          this.held = buf;
          return;
        }
        this.seenContent = true;
      }
      if (buf !== "" || logprobs) this.rest(buf, logprobs);
      return;
    }
  }

  flush(): void {
    const h = this.held;
    this.held = "";
    if (h === "") return;
    if (this.inside) this.reasoning(h);
    else this.rest(h);
  }
}

/** Tool calls in a model's own syntax, among content ("auto"). */
class NativeToolParser {
  private held = "";
  /** Text of a call block being read, once its start marker was seen. */
  private block: string | undefined;
  private calls = 0;
  private readonly start: string;
  private readonly end: string | undefined;
  private atStart = true;

  constructor(
    private readonly family: ToolFamily,
    private readonly out: OutputChannels,
  ) {
    this.start = family === "mistral" ? "[TOOL_CALLS]" : family === "llama3" ? "<|python_tag|>" : "<tool_call>";
    this.end = family === "hermes" || family === "none" ? "</tool_call>" : undefined;
  }

  get called(): number {
    return this.calls;
  }

  push(text: string, logprobs?: TokenLogprob[]): void {
    let buf = this.held + text;
    this.held = "";
    for (;;) {
      if (this.block !== undefined) {
        this.block += buf;
        // Without an end marker the block runs to the end of the output.
        if (this.end === undefined) return;
        const at = this.block.indexOf(this.end);
        if (at === -1) return;
        const body = this.block.slice(0, at);
        buf = this.block.slice(at + this.end.length);
        this.block = undefined;
        // A block that is not a call after all is content, as written.
        if (!this.emitBlock(body)) this.out.content(`${this.start}${body}${this.end}`, undefined);
        continue;
      }
      // Llama 3.x and plain-JSON templates may answer with a bare call object: only as the whole output.
      if (this.atStart && (this.family === "llama3" || this.family === "json")) {
        const trimmed = buf.replace(/^\s+/, "");
        if (trimmed === "") {
          this.held = buf;
          return;
        }
        if (trimmed.startsWith("{") || trimmed.startsWith("[")) {
          this.block = trimmed;
          this.bare = true;
          this.atStart = false;
          return;
        }
      }
      const at = buf.indexOf(this.start);
      if (at !== -1) {
        if (at > 0) this.content(buf.slice(0, at), logprobs);
        logprobs = undefined;
        this.block = "";
        this.atStart = false;
        buf = buf.slice(at + this.start.length);
        continue;
      }
      const keep = partialSuffix(buf, this.start);
      if (buf.length > keep) this.content(buf.slice(0, buf.length - keep), logprobs);
      else if (logprobs) this.out.content("", logprobs);
      this.held = buf.slice(buf.length - keep);
      return;
    }
  }

  private bare = false;

  private content(text: string, logprobs?: TokenLogprob[]): void {
    if (text.trim() !== "") this.atStart = false;
    this.out.content(text, logprobs);
  }

  private emitBlock(text: string): boolean {
    const calls = parseCalls(text.trim());
    if (!calls) return false;
    for (const c of calls) {
      const index = this.calls++;
      this.out.toolCall({ index, id: callId(), name: c.name, arguments: "" });
      this.out.toolCall({ index, arguments: c.arguments });
    }
    return true;
  }

  flush(): void {
    if (this.block !== undefined) {
      const block = this.block;
      this.block = undefined;
      // A block that is not a call after all (or was cut short) is content, as written.
      if (!this.emitBlock(block)) this.out.content(this.bare ? block : `${this.start}${block}`, undefined);
    }
    if (this.held !== "") this.out.content(this.held, undefined);
    this.held = "";
  }
}

/**
 * Calls a grammar forced as JSON: `{"name": "…", "arguments": {…}}`, or a list of them.
 * Streams each call's id and name as soon as the name is complete, then its arguments'
 * JSON text as it comes.
 */
class ForcedToolParser {
  private buf = "";
  private calls = 0;
  /** Inside a call's arguments value: its JSON depth and string state. */
  private args: { depth: number; inString: boolean; escape: boolean; started: boolean } | undefined;

  constructor(private readonly out: OutputChannels) {}

  get called(): number {
    return this.calls;
  }

  push(text: string): void {
    this.buf += text;
    for (;;) {
      if (this.args === undefined) {
        // Before a call: the list's "[", the previous call's closing "}" and the "," between them.
        const m = /^[\s[,}]*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*/.exec(this.buf);
        if (!m) return;
        const index = this.calls++;
        this.out.toolCall({ index, id: callId(), name: JSON.parse(`"${m[1]}"`) as string, arguments: "" });
        this.buf = this.buf.slice(m[0].length);
        this.args = { depth: 0, inString: false, escape: false, started: false };
      }
      const a = this.args;
      let i = 0;
      let done = false;
      for (; i < this.buf.length; i++) {
        const c = this.buf[i]!;
        if (a.inString) {
          if (a.escape) a.escape = false;
          else if (c === "\\") a.escape = true;
          else if (c === '"') {
            a.inString = false;
            if (a.depth === 0) {
              i++;
              done = true;
              break;
            }
          }
          continue;
        }
        if (c === '"') {
          a.inString = true;
          a.started = true;
        } else if (c === "{" || c === "[") {
          a.depth++;
          a.started = true;
        } else if (c === "}" || c === "]") {
          if (a.depth === 0) {
            done = true;
            break;
          }
          a.depth--;
          if (a.depth === 0) {
            i++;
            done = true;
            break;
          }
        } else if (!/\s/.test(c)) a.started = true;
        else if (a.started && a.depth === 0) {
          done = true;
          break;
        }
      }
      const piece = this.buf.slice(0, i);
      if (piece !== "") this.out.toolCall({ index: this.calls - 1, arguments: piece });
      this.buf = this.buf.slice(i);
      if (!done) return;
      this.args = undefined;
    }
  }

  flush(): void {
    this.buf = "";
  }
}

/** One choice's output: reasoning, then content and tool calls. */
export class ChatOutputParser {
  private readonly reasoning: ReasoningSplitter | undefined;
  private readonly native: NativeToolParser | undefined;
  private readonly forced: ForcedToolParser | undefined;

  constructor(spec: OutputSpec, private readonly out: OutputChannels) {
    if (spec.tools?.family === "forced") this.forced = new ForcedToolParser(out);
    else if (spec.tools) this.native = new NativeToolParser(spec.tools.family, out);
    const next = (text: string, logprobs?: TokenLogprob[]) => {
      if (this.forced) this.forced.push(text);
      else if (this.native) this.native.push(text, logprobs);
      else out.content(text, logprobs);
    };
    this.reasoning = spec.reasoning ? new ReasoningSplitter(spec.reasoning, (t) => out.reasoning(t), next) : undefined;
    this.push = this.reasoning ? (t, l) => this.reasoning!.push(t, l) : next;
  }

  readonly push: (text: string, logprobs?: TokenLogprob[]) => void;

  /** The end of the output: what was held back is released, an unfinished call block read. */
  finish(): void {
    this.reasoning?.flush();
    this.native?.flush();
    this.forced?.flush();
  }

  /** Tool calls this choice made: its finish reason is then "tool_calls". */
  get toolCalls(): number {
    return this.native?.called ?? this.forced?.called ?? 0;
  }
}
