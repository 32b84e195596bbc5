const unitMs: Readonly<Record<string, number>> = {
  ms: 1,
  s: 1000,
  sec: 1000,
  second: 1000,
  m: 60_000,
  min: 60_000,
  minute: 60_000,
  h: 3_600_000,
  hour: 3_600_000,
  d: 86_400_000,
  day: 86_400_000,
  w: 604_800_000,
  week: 604_800_000,
  y: 31_557_600_000,
  year: 31_557_600_000
}

const pattern = /^(\d+(?:\.\d+)?)\s*([a-z]+)$/

// Parses '90s', '1 minute', '6y', '500ms'; a bare integer means milliseconds. Returns
// undefined for anything else so callers report the problem in their own terms.
export function parseDuration (text: string): number | undefined {
  const trimmed = text.trim().toLowerCase()
  if (/^\d+$/.test(trimmed)) return Number(trimmed)
  const match = pattern.exec(trimmed)
  if (match === null) return undefined
  const [, amount, unit] = match as unknown as [string, string, string]
  const factor = unitMs[unit] ?? (unit.endsWith('s') ? unitMs[unit.slice(0, -1)] : undefined)
  if (factor === undefined) return undefined
  return Math.round(Number(amount) * factor)
}
