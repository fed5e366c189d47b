/*
 * Test-only stand-in for sc.exe, put in place of C:\windows\system32\sc.exe of the private Wine
 * prefix of packaging/windows/test.sh while it installs the MSI; never shipped.
 *
 * The MSI configures restart on failure with two custom actions running sc.exe: `sc failure ...`,
 * which Wine's sc.exe accepts (its SCM stores nothing and never restarts a service, though), and
 * `sc failureflag ehrsync 1`, which it does not know (Wine 8's SCM lacks that ChangeServiceConfig2
 * level): that would fail the installation. This program appends each command line it gets to
 * C:\sc-calls.log (and, on lines starting with #, why a command it passed on failed), so that the
 * test checks what the MSI asks for; answers `failureflag` with success itself; and runs every
 * other command with Wine's own sc.exe, which the test copies to sc-wine.exe.
 *
 * Build: x86_64-w64-mingw32-gcc -municode -o sc.exe sc.c
 */
#include <windows.h>
#include <stdio.h>
#include <wchar.h>

/* The command line after the program's name, as CreateProcess got it. */
static const wchar_t *arguments(const wchar_t *p)
{
    if (*p == L'"') {
        for (p++; *p && *p != L'"'; p++)
            ;
        if (*p)
            p++;
    } else {
        while (*p && *p != L' ' && *p != L'\t')
            p++;
    }
    while (*p == L' ' || *p == L'\t')
        p++;
    return p;
}

static void record(const wchar_t *prefix, const wchar_t *text)
{
    char utf8[4096];
    int n = WideCharToMultiByte(CP_UTF8, 0, text, -1, utf8, sizeof utf8, NULL, NULL);
    char head[64];
    int m = WideCharToMultiByte(CP_UTF8, 0, prefix, -1, head, sizeof head, NULL, NULL);
    FILE *log = _wfopen(L"C:\\sc-calls.log", L"ab");
    if (log && n > 0 && m > 0)
        fprintf(log, "%s%s\r\n", head, utf8);
    if (log)
        fclose(log);
}

int wmain(int argc, wchar_t **argv)
{
    const wchar_t *args = arguments(GetCommandLineW());
    record(L"", args);
    if (argc > 1 && _wcsicmp(argv[1], L"failureflag") == 0)
        return 0;

    wchar_t real[MAX_PATH];
    UINT len = GetSystemDirectoryW(real, MAX_PATH);
    if (len == 0 || len + 16 > MAX_PATH)
        return 1;
    wcscat(real, L"\\sc-wine.exe");
    wchar_t command[8192];
    if (_snwprintf(command, 8192, L"\"%ls\" %ls", real, args) < 0)
        return 1;
    command[8191] = 0;

    STARTUPINFOW si = { .cb = sizeof si };
    PROCESS_INFORMATION pi;
    if (!CreateProcessW(real, command, NULL, NULL, FALSE, 0, NULL, NULL, &si, &pi)) {
        wchar_t error[64];
        _snwprintf(error, 64, L"%lu", GetLastError());
        error[63] = 0;
        record(L"# cannot run sc-wine.exe: error ", error);
        return 1;
    }
    WaitForSingleObject(pi.hProcess, INFINITE);
    DWORD code = 1;
    GetExitCodeProcess(pi.hProcess, &code);
    if (code != 0) {
        wchar_t status[64];
        _snwprintf(status, 64, L"%lu", code);
        status[63] = 0;
        record(L"# sc-wine.exe exited ", status);
    }
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
    return (int)code;
}
