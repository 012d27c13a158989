/*
 * fake_nvml.c - test equipment: a fake NVIDIA Management Library (libnvidia-ml.so).
 *
 * The real WhaleFlux worker loads this through its ordinary NVML library-path option
 * (nvml-wrapper: Nvml::builder().lib_path(path).init()), so GPU telemetry and GPU faults can be
 * tested on machines without NVIDIA hardware. Product code never knows it is fake.
 *
 * The GPUs are described by a plain-text state file whose path is in the environment variable
 * WHALEFLUX_FAKE_NVML_STATE. The file is re-read on every call, so a test changes what the
 * worker sees (a hot GPU, ECC errors, a GPU that fell off the bus) by rewriting it while the
 * worker runs. Tests must replace it atomically (write a temporary file, rename it over).
 *
 * Format: one "key value" per line; the value is the rest of the line after one space.
 * Lines starting with '#' (after optional blanks) and blank lines are ignored, as are unknown
 * keys. Numeric values may be decimal or 0x-hex and may be followed by blanks and a '#' comment;
 * string values (name, uuid) are the rest of the line with trailing blanks trimmed.
 *
 *   gpu_count 2
 *   gpu.N.name NVIDIA H100 80GB HBM3
 *   gpu.N.uuid GPU-00000000-0000-0000-0000-00000000000N   (default: N as 12 hex digits)
 *   gpu.N.temperature_c 45
 *   gpu.N.slowdown_c 87                  NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
 *   gpu.N.shutdown_c 92                  NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
 *   gpu.N.power_mw 250000
 *   gpu.N.power_limit_mw 700000          enforced power limit
 *   gpu.N.memory_total 85899345920       bytes
 *   gpu.N.memory_used 1073741824         bytes
 *   gpu.N.util_gpu 30                    percent
 *   gpu.N.util_memory 10                 percent
 *   gpu.N.ecc_uncorrected_volatile 0
 *   gpu.N.ecc_uncorrected_aggregate 0
 *   gpu.N.ecc_corrected_volatile 0
 *   gpu.N.ecc_corrected_aggregate 0
 *   gpu.N.throttle_reasons 0             bitmask of nvmlClocksThrottleReason* values
 *   gpu.N.pcie_replays 0                 nvmlDeviceGetPcieReplayCounter
 *   gpu.N.retired_pages_pending 0        nvmlDeviceGetRetiredPagesPendingStatus
 *   gpu.N.remapped_rows_correctable 0    nvmlDeviceGetRemappedRows: corrRows
 *   gpu.N.remapped_rows_uncorrectable 0  nvmlDeviceGetRemappedRows: uncRows
 *   gpu.N.row_remap_pending 0            nvmlDeviceGetRemappedRows: isPending
 *   gpu.N.row_remap_failure 0            nvmlDeviceGetRemappedRows: failureOccurred
 *   gpu.N.nvlink_links 4                 links 0..n-1 exist (at most 18)
 *   gpu.N.nvlink.L.active 1
 *   gpu.N.nvlink.L.replay_errors 0       NVML_NVLINK_ERROR_DL_REPLAY
 *   gpu.N.nvlink.L.recovery_errors 0     NVML_NVLINK_ERROR_DL_RECOVERY
 *   gpu.N.nvlink.L.crc_flit_errors 0     NVML_NVLINK_ERROR_DL_CRC_FLIT
 *   gpu.N.nvlink.L.crc_data_errors 0     NVML_NVLINK_ERROR_DL_CRC_DATA
 *   gpu.N.lost 0                         1: every call on the device returns GPU_IS_LOST
 *   xid.S G C                            XID event S (from 1, in order): GPU G reports XID C;
 *                                        an event set delivers those written after it was
 *                                        created, once each (nvmlEventSetWait_v2)
 *
 * Missing keys take the defaults above (gpu_count defaults to 0). Booleans are 0/1 or
 * false/true.
 *
 * Failure behaviour:
 *   - variable unset, or the file cannot be opened: nvmlInit* returns DRIVER_NOT_LOADED (9);
 *   - file vanishes after a successful init: calls that need state return UNKNOWN (999);
 *   - malformed numeric value, value out of range, or file over 1 MiB: UNKNOWN (999);
 *   - handle whose index is no longer below gpu_count: GPU_IS_LOST (15).
 *
 * Build: gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o libnvidia-ml-fake.so fake_nvml.c state.c -lpthread
 * (fake_nvml.h holds the types; state.c the state file, the lock and the calls' prologue)
 *
 * All state lives in static storage behind one mutex; no call allocates on the heap.
 */

#include "fake_nvml.h"

static struct nvmlEventSet_st g_sets[MAX_EVENT_SETS];


/* ---- exported API ---- */

#define EXPORT __attribute__((visibility("default")))

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    r = load_state();
    if (r == NVML_SUCCESS) {
        unsigned int i;

        for (i = 0; i < MAX_GPUS; i++)
            g_devices[i].index = i;
        g_init_count++;
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlInit(void)
{
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t r = NVML_SUCCESS;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        g_init_count--;
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt request issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case 23: return "Ran out of critical resources, other than memory";
    case 24: return "The requested frequency is not supported";
    case 25: return "The provided version is invalid/unsupported";
    case 26: return "The requested functionality has been deprecated";
    case 27: return "The system is not ready for the request";
    case 28: return "No GPUs were found";
    case 29: return "Resource not in correct state to perform requested operation";
    case 30: return "Reset type is not supported";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t system_string(char *buf, unsigned int length, const char *value)
{
    nvmlReturn_t r = NVML_SUCCESS;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        r = copy_string(buf, length, value);
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    return system_string(version, length, DRIVER_VERSION);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    return system_string(version, length, NVML_VERSION);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else if (deviceCount == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if ((r = begin_call()) == NVML_SUCCESS)
        *deviceCount = g_state.gpu_count;
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else if (device == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if ((r = begin_call()) != NVML_SUCCESS)
        ;
    else if (index >= g_state.gpu_count)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if (g_state.gpus[index].lost)
        r = NVML_ERROR_GPU_IS_LOST;
    else
        *device = &g_devices[index];
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    struct fake_gpu *g;
    unsigned int i;
    nvmlReturn_t r = device_begin(device, index, &g, &i);

    if (r != NVML_SUCCESS)
        return r;
    *index = i;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, name, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    return device_end(copy_string(name, length, g->name));
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, uuid, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    return device_end(copy_string(uuid, length, g->uuid));
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device,
                                             nvmlTemperatureSensors_t sensorType,
                                             unsigned int *temp)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, temp, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (sensorType != 0) /* NVML_TEMPERATURE_GPU */
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    *temp = g->temperature_c;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device,
                                                      nvmlTemperatureThresholds_t thresholdType,
                                                      unsigned int *temp)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, temp, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    switch (thresholdType) {
    case 0: /* NVML_TEMPERATURE_THRESHOLD_SHUTDOWN */
        *temp = g->shutdown_c;
        return device_end(NVML_SUCCESS);
    case 1: /* NVML_TEMPERATURE_THRESHOLD_SLOWDOWN */
        *temp = g->slowdown_c;
        return device_end(NVML_SUCCESS);
    default:
        return device_end(NVML_ERROR_NOT_SUPPORTED);
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, power, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *power = g->power_mw;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, limit, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *limit = g->power_limit_mw;
    return device_end(NVML_SUCCESS);
}

static unsigned long long memory_free(const struct fake_gpu *g)
{
    return g->memory_used >= g->memory_total ? 0 : g->memory_total - g->memory_used;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, memory, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    memory->total = g->memory_total;
    memory->used = g->memory_used;
    memory->free = memory_free(g);
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, memory, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    /* Real NVML rejects a struct whose version is not NVML_STRUCT_VERSION(Memory, 2). */
    if (memory->version != NVML_MEMORY_V2_VERSION)
        return device_end(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = g->memory_total;
    memory->reserved = 0;
    memory->used = g->memory_used;
    memory->free = memory_free(g);
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                  nvmlUtilization_t *utilization)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, utilization, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    utilization->gpu = g->util_gpu;
    utilization->memory = g->util_memory;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device,
                                                nvmlMemoryErrorType_t errorType,
                                                nvmlEccCounterType_t counterType,
                                                unsigned long long *eccCounts)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, eccCounts, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (errorType > 1 || counterType > 1)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    if (errorType == 1)
        *eccCounts = counterType == 0 ? g->ecc_uncorrected_volatile : g->ecc_uncorrected_aggregate;
    else
        *eccCounts = counterType == 0 ? g->ecc_corrected_volatile : g->ecc_corrected_aggregate;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, value, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *value = g->pcie_replays;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device,
                                                           nvmlEnableState_t *isPending)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, isPending, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *isPending = g->retired_pages_pending ? 1 : 0;
    return device_end(NVML_SUCCESS);
}

/* Row remapping (Ampere and later): rows remapped for correctable and uncorrectable errors,
 * a remapping waiting for the next GPU reset, and a remapping that failed. */
EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows,
                                              unsigned int *uncRows, unsigned int *isPending,
                                              unsigned int *failureOccurred)
{
    struct fake_gpu *g;
    nvmlReturn_t r;

    if (uncRows == NULL || isPending == NULL || failureOccurred == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    r = device_begin(device, corrRows, &g, NULL);
    if (r != NVML_SUCCESS)
        return r;
    *corrRows = g->remapped_rows_correctable;
    *uncRows = g->remapped_rows_uncorrectable;
    *isPending = g->row_remap_pending ? 1 : 0;
    *failureOccurred = g->row_remap_failure ? 1 : 0;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                           unsigned long long *clocksEventReasons)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, clocksEventReasons, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *clocksEventReasons = g->throttle_reasons;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(
    nvmlDevice_t device, unsigned long long *clocksThrottleReasons)
{
    return nvmlDeviceGetCurrentClocksEventReasons(device, clocksThrottleReasons);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link,
                                             nvmlEnableState_t *isActive)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, isActive, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (link >= g->nvlink_links)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    *isActive = g->links[link].active ? 1u : 0u;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link,
                                                    nvmlNvLinkErrorCounter_t counter,
                                                    unsigned long long *counterValue)
{
    struct fake_gpu *g;
    const struct fake_link *l;
    nvmlReturn_t r = device_begin(device, counterValue, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (link >= g->nvlink_links)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    l = &g->links[link];
    switch (counter) {
    case 0: *counterValue = l->replay_errors; break;   /* NVML_NVLINK_ERROR_DL_REPLAY */
    case 1: *counterValue = l->recovery_errors; break; /* NVML_NVLINK_ERROR_DL_RECOVERY */
    case 2: *counterValue = l->crc_flit_errors; break; /* NVML_NVLINK_ERROR_DL_CRC_FLIT */
    case 3: *counterValue = l->crc_data_errors; break; /* NVML_NVLINK_ERROR_DL_CRC_DATA */
    case 4: *counterValue = 0; break;                  /* NVML_NVLINK_ERROR_DL_ECC_DATA */
    default: return device_end(NVML_ERROR_INVALID_ARGUMENT);
    }
    return device_end(NVML_SUCCESS);
}

/* ---- XID events ---- */

static unsigned int last_xid_seq(void)
{
    unsigned int i, last = 0;

    for (i = 0; i < g_state.xid_count; i++)
        if (g_state.xids[i].seq > last)
            last = g_state.xids[i].seq;
    return last;
}

static int set_index(nvmlEventSet_t set)
{
    uintptr_t p = (uintptr_t)set;
    uintptr_t base = (uintptr_t)&g_sets[0];

    if (set == NULL || p < base || p >= (uintptr_t)&g_sets[MAX_EVENT_SETS])
        return -1;
    if ((p - base) % sizeof(g_sets[0]) != 0 || !set->used)
        return -1;
    return (int)((p - base) / sizeof(g_sets[0]));
}

/* A new set delivers the XIDs written after it was created, as NVML delivers events after
 * registration. */
EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t r;
    unsigned int i;

    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&g_lock);
    r = begin_call();
    if (r == NVML_SUCCESS) {
        r = NVML_ERROR_UNKNOWN;
        for (i = 0; i < MAX_EVENT_SETS; i++) {
            if (!g_sets[i].used) {
                memset(&g_sets[i], 0, sizeof(g_sets[i]));
                g_sets[i].used = 1;
                g_sets[i].delivered = last_xid_seq();
                *set = &g_sets[i];
                r = NVML_SUCCESS;
                break;
            }
        }
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device,
                                                     unsigned long long *eventTypes)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, eventTypes, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *eventTypes = EVENT_TYPE_XID;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                             nvmlEventSet_t set)
{
    struct fake_gpu *g;
    unsigned int index;
    nvmlReturn_t r = device_begin(device, set, &g, &index);

    if (r != NVML_SUCCESS)
        return r;
    if (set_index(set) < 0)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    if ((eventTypes & ~EVENT_TYPE_XID) != 0)
        return device_end(NVML_ERROR_NOT_SUPPORTED);
    set->registered[index] |= eventTypes;
    return device_end(NVML_SUCCESS);
}

/* Delivers the next XID (by seq) of a GPU the set registered, waiting up to timeoutms. */
EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                        unsigned int timeoutms)
{
    unsigned int waited = 0;

    if (data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (;;) {
        nvmlReturn_t r;
        const struct fake_xid *next = NULL;
        unsigned int i;

        pthread_mutex_lock(&g_lock);
        if (set_index(set) < 0) {
            pthread_mutex_unlock(&g_lock);
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        r = begin_call();
        if (r != NVML_SUCCESS) {
            pthread_mutex_unlock(&g_lock);
            return r;
        }
        for (i = 0; i < g_state.xid_count; i++) {
            const struct fake_xid *x = &g_state.xids[i];

            if (x->seq > set->delivered && x->gpu < MAX_GPUS &&
                (set->registered[x->gpu] & EVENT_TYPE_XID) != 0 &&
                (next == NULL || x->seq < next->seq))
                next = x;
        }
        if (next != NULL) {
            set->delivered = next->seq;
            data->device = &g_devices[next->gpu];
            data->eventType = EVENT_TYPE_XID;
            data->eventData = next->code;
            data->gpuInstanceId = 0xFFFFFFFFu;
            data->computeInstanceId = 0xFFFFFFFFu;
            pthread_mutex_unlock(&g_lock);
            return NVML_SUCCESS;
        }
        pthread_mutex_unlock(&g_lock);
        if (waited >= timeoutms)
            return NVML_ERROR_TIMEOUT;
        {
            struct timespec ts = {0, 20 * 1000 * 1000};

            nanosleep(&ts, NULL);
        }
        waited += 20;
    }
}

EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data,
                                     unsigned int timeoutms)
{
    return nvmlEventSetWait_v2(set, data, timeoutms);
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    pthread_mutex_lock(&g_lock);
    if (set_index(set) < 0) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    set->used = 0;
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}
