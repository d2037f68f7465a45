//! Private files on Windows: an ACL that grants the current user full
//! access and nobody else anything, cut from what the folder would have
//! it inherit (what `icacls FILE /inheritance:r /grant:r %USERNAME%:F`
//! does), the counterpart of mode 0600.

use std::{io, os::windows::ffi::OsStrExt, path::Path, ptr};

use windows_sys::Win32::{
    Foundation::{ERROR_SUCCESS, LocalFree},
    Security::{
        ACL,
        Authorization::{
            EXPLICIT_ACCESS_W, NO_MULTIPLE_TRUSTEE, SE_FILE_OBJECT, SET_ACCESS, SetEntriesInAclW,
            SetNamedSecurityInfoW, TRUSTEE_IS_NAME, TRUSTEE_IS_USER, TRUSTEE_W,
        },
        DACL_SECURITY_INFORMATION, NO_INHERITANCE, PROTECTED_DACL_SECURITY_INFORMATION,
    },
    Storage::FileSystem::FILE_ALL_ACCESS,
};

/// Leaves `path` to the current user alone.
pub fn owner_only(path: &Path) -> io::Result<()> {
    // A name SetEntriesInAcl knows: the user this process runs as.
    let mut user: Vec<u16> = "CURRENT_USER".encode_utf16().chain([0]).collect();
    let mut name: Vec<u16> = path.as_os_str().encode_wide().chain([0]).collect();
    let access = EXPLICIT_ACCESS_W {
        grfAccessPermissions: FILE_ALL_ACCESS,
        grfAccessMode: SET_ACCESS,
        grfInheritance: NO_INHERITANCE,
        Trustee: TRUSTEE_W {
            pMultipleTrustee: ptr::null_mut(),
            MultipleTrusteeOperation: NO_MULTIPLE_TRUSTEE,
            TrusteeForm: TRUSTEE_IS_NAME,
            TrusteeType: TRUSTEE_IS_USER,
            ptstrName: user.as_mut_ptr(),
        },
    };
    let mut acl: *mut ACL = ptr::null_mut();
    // SAFETY: one valid entry in, a fresh ACL out (freed below).
    let made = unsafe { SetEntriesInAclW(1, &access, ptr::null(), &mut acl) };
    if made != ERROR_SUCCESS {
        return Err(io::Error::from_raw_os_error(made as i32));
    }
    // SAFETY: `name` is NUL-terminated; `acl` is the valid ACL made above;
    // owner, group and SACL are left as they are.
    let set = unsafe {
        SetNamedSecurityInfoW(
            name.as_mut_ptr(),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            ptr::null_mut(),
            ptr::null_mut(),
            acl,
            ptr::null(),
        )
    };
    // SAFETY: `acl` came from SetEntriesInAclW, which LocalAlloc'd it.
    unsafe { LocalFree(acl.cast()) };
    if set != ERROR_SUCCESS {
        return Err(io::Error::from_raw_os_error(set as i32));
    }
    Ok(())
}
