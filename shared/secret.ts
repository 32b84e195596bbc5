import { inspect } from 'node:util'

// A secret from the environment. It prints, serialises and logs as '[redacted]' however it
// is reached (JSON.stringify, pino, console.log, util.inspect), so keeping secrets out of
// logs does not depend on every call site remembering to. Only reveal() gives the value.
export class Secret {
  readonly #value: string
  readonly #shown: string

  constructor (value: string, shown = '[redacted]') {
    this.#value = value
    this.#shown = shown
  }

  reveal (): string {
    return this.#value
  }

  toJSON (): string {
    return this.#shown
  }

  toString (): string {
    return this.#shown
  }

  [inspect.custom] (): string {
    return this.#shown
  }
}

// postgres://user:password@host/db → postgres://user:***@host/db, so an operator can see
// which database is meant without the password.
export function maskUrlPassword (raw: string): string {
  try {
    const url = new URL(raw)
    if (url.password !== '') url.password = '***'
    return url.toString()
  } catch {
    return '[redacted]'
  }
}
