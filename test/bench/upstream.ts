// The stand-in EHR for benchmarks, as its own process so it shares neither an event loop
// nor a CPU account with what is measured. Prints `{"port":…,"bytes":…}` on stdout once
// listening.
import { listenUpstream } from './upstream-server.js'

const server = listenUpstream(info => { process.stdout.write(JSON.stringify(info) + '\n') })
process.once('SIGTERM', () => { server.closeAllConnections(); server.close() })
