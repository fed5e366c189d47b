/*
 * Test-only bcryptprimitives.dll for running ehrsync.exe under Wine 8 (packaging/windows/test.sh).
 *
 * Rust's standard library takes its randomness from ProcessPrng in bcryptprimitives.dll, which
 * every Windows 10 and later has and Debian's Wine 8 lacks: without this DLL beside it, the exe
 * exits with code 53 before printing anything. Here ProcessPrng asks BCryptGenRandom (which Wine
 * has) for the system's preferred RNG. Never ship it: the MSI must not carry it, and build.sh
 * refuses an MSI that does.
 *
 * Build: x86_64-w64-mingw32-gcc -shared -o bcryptprimitives.dll bcryptprimitives.c -lbcrypt
 */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
