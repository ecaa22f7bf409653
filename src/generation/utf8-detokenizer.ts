import type { Token } from "../engine/types.js";

const REPLACEMENT = "\uFFFD";
/** A UTF-8 character is at most 4 bytes, so at most 4 byte-tokens can be pending. */
const MAX_PENDING = 4;
/** Tokens of context passed back to the detokenizer so leading spaces come out right. */
const CONTEXT = 4;

export type Detokenize = (tokens: readonly Token[], lastTokens?: readonly Token[]) => string;

/**
 * Turns a token stream into text deltas without ever splitting a character: byte
 * tokens that decode to U+FFFD on their own are held until the character completes.
 */
export class Utf8Detokenizer {
  private pending: Token[] = [];
  private context: Token[] = [];

  /** `precedingTokens`: the prompt's tail, so the first token's leading space comes out right. */
  constructor(private readonly detokenize: Detokenize, precedingTokens: readonly Token[] = []) {
    this.context = precedingTokens.slice(-CONTEXT);
  }

  /** The text this token completes, possibly "" while a character is incomplete. */
  push(token: Token): string {
    this.pending.push(token);
    const text = this.detokenize(this.pending, this.context);
    if (text.endsWith(REPLACEMENT) && this.pending.length < MAX_PENDING) return "";
    this.commit();
    return text;
  }

  /** Whatever is still held at the end of generation (a truly invalid sequence stays U+FFFD). */
  flush(): string {
    if (this.pending.length === 0) return "";
    const text = this.detokenize(this.pending, this.context);
    this.commit();
    return text;
  }

  private commit(): void {
    for (const t of this.pending) this.context.push(t);
    if (this.context.length > CONTEXT) this.context.splice(0, this.context.length - CONTEXT);
    this.pending.length = 0;
  }
}
