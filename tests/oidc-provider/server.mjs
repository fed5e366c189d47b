// A third-party OpenID provider — panva's oidc-provider from the npm registry — for ehrsync's
// `login` interoperability test (tests/third_party_oidc.rs), driven through its own development
// login and consent pages (devInteractions: any login, any password).
//
// One confidential native client (OIDC_CLIENT_ID / OIDC_CLIENT_SECRET, client_secret_basic) with
// the loopback redirect http://127.0.0.1/callback: for native clients oidc-provider accepts any
// port on a loopback redirect URI (RFC 8252 §7.3). Authorization code with S256 PKCE required,
// the device flow, refresh tokens when `offline_access` is granted (which needs prompt=consent
// at the authorization endpoint), rotated on every use. Access tokens (opaque) live
// ACCESS_TTL_SECONDS (default 4). Revocation endpoint enabled. A fresh RS256 key per start.
//
// Prints {"issuer": "..."} on stdout once listening; exits when stdin closes.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const clientId = env('OIDC_CLIENT_ID');
const clientSecret = env('OIDC_CLIENT_SECRET');
const accessTtl = Number(process.env.ACCESS_TTL_SECONDS ?? '4');

// stdout carries exactly one line (the test reads it, then stops reading): oidc-provider prints
// its notices with console.info, so those go to stderr — and the expected development-setup
// notices and warnings (default pages, dev interactions, in-memory storage, Node.js version) not at all.
const expected = [
  'oidc-provider NOTICE: ',
  'oidc-provider WARNING: a quick start development-only feature devInteractions is enabled',
  'oidc-provider WARNING: a quick start development-only in-memory adapter is used',
  'oidc-provider WARNING: Unsupported runtime',
];
const quiet = (print) => (...args) => {
  const text = String(args[0] ?? '');
  if (!expected.some((prefix) => text.includes(prefix))) print(...args);
};
console.info = quiet(console.error.bind(console));
console.log = quiet(console.error.bind(console));
console.warn = quiet(console.warn.bind(console));
process.stdout.on('error', () => {});

// Imported after the console is set up: the module warns about the runtime as it loads.
const { default: Provider } = await import('oidc-provider');

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const http = createServer();
await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${http.address().port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    application_type: 'native',
    redirect_uris: ['http://127.0.0.1/callback'],
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'offline_access', 'api'],
  pkce: { required: () => true },
  rotateRefreshToken: true,
  findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  clientBasedCORS: () => false,
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
    },
  },
  ttl: {
    AccessToken: accessTtl,
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: 3600,
    RefreshToken: 24 * 60 * 60,
    Interaction: 600,
    Session: 3600,
    Grant: 24 * 60 * 60,
  },
});

// Test scaffolding, not part of oidc-provider: POST /test/revoke-all revokes every grant this
// server has issued — its refresh tokens, access tokens and codes (the MemoryAdapter keeps them
// indexed by grant) and the grant itself — as if the user had withdrawn consent. Answers
// {"revoked_grants": N}.
const grants = new Set();
provider.on('grant.saved', (grant) => grants.add(grant.jti));
const revokeAll = async () => {
  let revoked = 0;
  for (const grantId of grants) {
    await provider.RefreshToken.revokeByGrantId(grantId);
    await provider.Grant.adapter.destroy(grantId);
    revoked += 1;
  }
  grants.clear();
  return revoked;
};

provider.on('server_error', (_ctx, error) => console.error('oidc-provider server_error:', error));

const handle = provider.callback();
http.on('request', (req, res) => {
  if (req.method === 'POST' && req.url === '/test/revoke-all') {
    revokeAll().then((revoked) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ revoked_grants: revoked }));
    }, (error) => {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(error));
    });
    return;
  }
  handle(req, res);
});

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
process.stdin.resume();
process.stdin.on('end', () => {
  http.close();
  process.exit(0);
});
