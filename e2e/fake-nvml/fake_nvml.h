/*
 * fake_nvml.h - the fake NVML's types and what its two files share: fake_nvml.c (the exported
 * NVML functions, documented there) and state.c (the state file, the lock and the common
 * prologue of every call). Nothing here is exported from the library.
 */
#ifndef WHALEFLUX_FAKE_NVML_H
#define WHALEFLUX_FAKE_NVML_H

#define _POSIX_C_SOURCE 200809L /* O_CLOEXEC, ssize_t under strict -std= modes */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STATE_ENV "WHALEFLUX_FAKE_NVML_STATE"

/* ---- NVML types and constants (values from nvml.h / nvml-wrapper-sys bindings) ---- */

typedef unsigned int nvmlReturn_t;

#define NVML_SUCCESS 0u
#define NVML_ERROR_UNINITIALIZED 1u
#define NVML_ERROR_INVALID_ARGUMENT 2u
#define NVML_ERROR_NOT_SUPPORTED 3u
#define NVML_ERROR_INSUFFICIENT_SIZE 7u
#define NVML_ERROR_DRIVER_NOT_LOADED 9u
#define NVML_ERROR_TIMEOUT 10u
#define NVML_ERROR_GPU_IS_LOST 15u
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25u
#define NVML_ERROR_UNKNOWN 999u

typedef struct nvmlDevice_st {
    unsigned int index;
} *nvmlDevice_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML_STRUCT_VERSION(Memory, 2) */
#define NVML_MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef unsigned int nvmlEnableState_t;        /* NVML_FEATURE_DISABLED 0, ENABLED 1 */
typedef unsigned int nvmlTemperatureSensors_t; /* NVML_TEMPERATURE_GPU 0 */
typedef unsigned int nvmlTemperatureThresholds_t; /* SHUTDOWN 0, SLOWDOWN 1, ... */
typedef unsigned int nvmlMemoryErrorType_t;    /* CORRECTED 0, UNCORRECTED 1 */
typedef unsigned int nvmlEccCounterType_t;     /* VOLATILE 0, AGGREGATE 1 */
typedef unsigned int nvmlNvLinkErrorCounter_t; /* DL_REPLAY 0 .. DL_ECC_DATA 4 */

#define MAX_GPUS 64
#define MAX_LINKS 18 /* NVML_NVLINK_MAX_LINKS */
#define STR_CAP 96   /* NVML_DEVICE_NAME_V2_BUFFER_SIZE / NVML_DEVICE_UUID_V2_BUFFER_SIZE */
#define FILE_CAP (1u << 20)

#define DRIVER_VERSION "999.99-fake"
#define NVML_VERSION "12.999.99-fake"

/* ---- state ---- */

struct fake_link {
    int active;
    unsigned long long replay_errors;
    unsigned long long recovery_errors;
    unsigned long long crc_flit_errors;
    unsigned long long crc_data_errors;
};

struct fake_gpu {
    char name[STR_CAP];
    char uuid[STR_CAP];
    unsigned int temperature_c;
    unsigned int slowdown_c;
    unsigned int shutdown_c;
    unsigned int power_mw;
    unsigned int power_limit_mw;
    unsigned long long memory_total;
    unsigned long long memory_used;
    unsigned int util_gpu;
    unsigned int util_memory;
    unsigned long long ecc_uncorrected_volatile;
    unsigned long long ecc_uncorrected_aggregate;
    unsigned long long ecc_corrected_volatile;
    unsigned long long ecc_corrected_aggregate;
    unsigned long long throttle_reasons;
    unsigned int pcie_replays;
    int retired_pages_pending;
    unsigned int remapped_rows_correctable;
    unsigned int remapped_rows_uncorrectable;
    int row_remap_pending;
    int row_remap_failure;
    unsigned int nvlink_links;
    struct fake_link links[MAX_LINKS];
    int lost;
};

/* One XID event: `xid.<seq> <gpu> <code>` (seq from 1, in the order a test wrote them). */
struct fake_xid {
    unsigned int seq;
    unsigned int gpu;
    unsigned long long code;
};

#define MAX_XIDS 256
#define MAX_EVENT_SETS 16
#define EVENT_TYPE_XID 0x8ull /* nvmlEventTypeXidCriticalError */

struct fake_state {
    unsigned int gpu_count;
    struct fake_gpu gpus[MAX_GPUS];
    unsigned int xid_count;
    struct fake_xid xids[MAX_XIDS];
};

/* An event set: the event types each GPU registered, and the last XID it delivered. */
struct nvmlEventSet_st {
    int used;
    unsigned long long registered[MAX_GPUS];
    unsigned int delivered;
};
typedef struct nvmlEventSet_st *nvmlEventSet_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

#define INTERNAL __attribute__((visibility("hidden")))

/* state.c */
extern INTERNAL pthread_mutex_t g_lock;
extern INTERNAL unsigned int g_init_count; /* nvmlInit reference count */
extern INTERNAL struct fake_state g_state; /* last parse; valid under g_lock after load_state */
extern INTERNAL struct nvmlDevice_st g_devices[MAX_GPUS]; /* handles point into this array */

INTERNAL nvmlReturn_t load_state(void);
INTERNAL nvmlReturn_t begin_call(void);
INTERNAL int handle_index(nvmlDevice_t device, unsigned int *index);
INTERNAL nvmlReturn_t device_begin(nvmlDevice_t device, const void *out, struct fake_gpu **gpu,
                                   unsigned int *index_out);
INTERNAL nvmlReturn_t device_end(nvmlReturn_t r);
INTERNAL nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src);

#endif
