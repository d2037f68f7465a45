/*
 * ProcessPrng, which Rust's standard library on Windows (8 and later)
 * takes its random bytes from, for Wine releases that lack
 * bcryptprimitives.dll (Debian 12's Wine 8.0). Tests only: on Windows
 * the system's own DLL is used. It asks the same source Windows does,
 * RtlGenRandom (advapi32's SystemFunction036).
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len) {
        ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, n))
            return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
