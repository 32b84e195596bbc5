// The stand-in EHR in a worker thread, kept for in-process harnesses (test/perf imports it);
// `npm run bench` runs upstream.ts as its own process instead.
import { parentPort } from 'node:worker_threads'
import { listenUpstream } from './upstream-server.js'

const server = listenUpstream(info => { parentPort?.postMessage(info) })
parentPort?.on('message', () => { server.closeAllConnections(); server.close() })
