import t from 'tap'
import { helmetHeaders } from '../../gateway/security-headers.js'

// The API profile of the security headers (OWASP REST Security): nothing may be framed,
// scripted or referred, HSTS for a year, and none of the HTML-only legacy headers.
t.test('the security headers every gateway response carries', async t => {
  t.same(helmetHeaders(), {
    'content-security-policy': "default-src 'none';frame-ancestors 'none'",
    'cross-origin-opener-policy': 'same-origin',
    'cross-origin-resource-policy': 'same-origin',
    'referrer-policy': 'no-referrer',
    'strict-transport-security': 'max-age=31536000; includeSubDomains',
    'x-content-type-options': 'nosniff',
    'x-frame-options': 'DENY'
  })
})
