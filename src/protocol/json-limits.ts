/**
 * Bounds on JSON checked on the raw text, before it is parsed: parsing and walking a
 * value nested thousands deep costs stack (JSON.stringify of one throws RangeError).
 */

/** Whether `text` nests arrays/objects deeper than `max` (strings are skipped). A linear scan. */
export function jsonDepthExceeds(text: string, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 92 /* \ */) i++;
      else if (c === 34 /* " */) inString = false;
      continue;
    }
    if (c === 34) inString = true;
    else if (c === 91 /* [ */ || c === 123 /* { */) {
      if (++depth > max) return true;
    } else if (c === 93 /* ] */ || c === 125 /* } */) depth--;
  }
  return false;
}

/** Whether a parsed value has an own `__proto__` key, or a `constructor` holding a `prototype` key (prototype poisoning), anywhere. */
export function hasPoisonedKeys(value: unknown): boolean {
  const stack: unknown[] = [value];
  while (stack.length > 0) {
    const v = stack.pop();
    if (v === null || typeof v !== "object") continue;
    if (Array.isArray(v)) {
      for (const x of v) if (x !== null && typeof x === "object") stack.push(x);
      continue;
    }
    if (Object.hasOwn(v, "__proto__")) return true;
    const c = (v as Record<string, unknown>).constructor;
    if (Object.hasOwn(v, "constructor") && c !== null && typeof c === "object" && Object.hasOwn(c, "prototype")) return true;
    for (const x of Object.values(v)) if (x !== null && typeof x === "object") stack.push(x);
  }
  return false;
}
