#!/usr/bin/env node
// The process boundary: the only place in cli/ that touches process.env, argv and the
// exit code. Everything below takes them as arguments (STYLE habit 5).
import { run } from './program.js'

process.exitCode = await run(process.argv.slice(2), {
  env: process.env,
  stdout: process.stdout,
  stderr: process.stderr,
  now: () => new Date(),
  cwd: process.cwd(),
  // Merged beneath the real environment, as the gateway does: the environment wins.
  dotenvPath: '.env'
})
