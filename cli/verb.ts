import type { Context } from './context.js'
import type { Human } from './output.js'

// STYLE habit 8: commander only parses argv into `I`; `run` does the work and returns
// data (what --json prints); `present` decides what a person sees of that data.
export interface Verb<I, O> {
  readonly run: (input: I, ctx: Context) => Promise<O>
  readonly present: (output: O, ctx: Context) => Human
}
